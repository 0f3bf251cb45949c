//! Router -> server links: one mutual-TLS QUIC connection per live server, dialled from the
//! discovery view and redialled with backoff. The router opens streams for pushes and kicks;
//! the server opens streams for session events and forwarded client messages.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use cim_core::batch::{BATCHES_IN_FLIGHT, Batcher};
use cim_core::discovery::ServerInfo;
use cim_core::transport;
use cim_core::transport::read_only_frame;
use cim_proto::v1::{
    Delivery, ForwardBatchResult, GroupChange, GroupChangePush, GroupMember, GroupResult,
    InboxHead, KickResult, KickUser, NoticePush, Presence, PresencePush, PullResult, Push,
    PushBatch, PushBatchResult, PushResult, Recipient, RenewResult, RouterRequest, SendAck,
    ServerControl, ServerRequest, SessionBatchResult, SessionResult, group_request, router_request,
    server_control, server_request,
};
use cim_proto::{ProstMessage, write_frame};
use futures_util::future::join_all;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::service::{RenewedSession, Sender, Service, ServiceError};

/// Pushes queued per server before senders wait.
const PUSH_QUEUE: usize = 4096;
/// Most pushes waiting for room in full push queues, all servers together; past it a push is
/// dropped (its entry is in the inbox, and the recipient pulls it at its next gap or connect)
/// rather than held in memory for a server that has stopped answering.
const PUSHES_WAITING: usize = 4 * PUSH_QUEUE;
/// Most of those waiting for one server: a server that hangs (its link up, its answers gone)
/// fills its own queue and this many places, and leaves the rest to servers that answer.
const PUSHES_WAITING_PER_SERVER: usize = PUSHES_WAITING / 4;
/// Encoded bytes of the pushes queued or waiting for one server before new ones are dropped
/// (for the recipients to pull): the counts above alone let a server that stops answering
/// hold thousands of broadcast pushes of 50,000 recipients, half a megabyte each.
const MAX_QUEUED_PUSH_BYTES: usize = 64 * 1024 * 1024;
/// Most pushes in one batch.
const MAX_BATCH: usize = 256;
/// Most encoded bytes of pushes in one batch: half the frame limit, so that a batch of large
/// messages (256 of 16 KiB are over 4 MiB) is never refused whole as too large.
const MAX_BATCH_BYTES: usize = MAX_INTERNAL_FRAME / 2;
/// Most recipients in one push: a broadcast to a server's 100,000 sessions goes as several,
/// each well under the frame limit (9 bytes or so per recipient).
const MAX_PUSH_RECIPIENTS: usize = 50_000;

/// What [`ServerLinks::notify`] tells users: a change they hear of, best effort.
#[derive(Debug, Clone)]
pub enum Notice {
    /// Someone who shares a group with them came online or went offline.
    Presence(Presence),
    /// Someone joined or left a group of theirs.
    GroupChange(GroupChange),
    /// Any other control frame, passed on as it is (`NoticePush`: a server older than it
    /// drops it).
    Control(server_control::Kind),
}

/// Sends the queued pushes of one server: each batch takes everything queued (up to
/// [`MAX_BATCH`]); up to [`BATCHES_IN_FLIGHT`] batches travel at once.
/// A push that fails leaves its entries in the inboxes: the recipients pull them when they
/// see the gap or reconnect.
async fn run_pusher(
    links: Arc<ServerLinks>,
    server_id: String,
    queue: mpsc::Receiver<Measured<Push>>,
    queued_bytes: Arc<AtomicUsize>,
) {
    let mut batches = Batcher::new(queue, BATCHES_IN_FLIGHT, MAX_BATCH)
        .weighed(|push: &Measured<Push>| push.len, MAX_BATCH_BYTES);
    while let Some((batch, permit)) = batches.next().await {
        let bytes: usize = batch.iter().map(|push| push.len).sum();
        queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
        let batch: Vec<Push> = batch.into_iter().map(|push| push.item).collect();
        let links = links.clone();
        let server_id = server_id.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let pushes = batch.len();
            let result = if pushes == 1 {
                let push = batch.into_iter().next().unwrap_or_default();
                let request = RouterRequest {
                    kind: Some(router_request::Kind::Push(push)),
                };
                links
                    .call::<PushResult>(&server_id, &request)
                    .await
                    .map(drop)
            } else {
                let request = RouterRequest {
                    kind: Some(router_request::Kind::Batch(PushBatch { pushes: batch })),
                };
                links
                    .call::<PushBatchResult>(&server_id, &request)
                    .await
                    .map(drop)
            };
            if let Err(e) = result {
                tracing::info!(server = %server_id, pushes, error = %e, "push failed; recipients will pull");
            }
        });
    }
}

/// An item with its encoded length, measured once when it is queued.
struct Measured<T> {
    item: T,
    len: usize,
}

/// Largest frame on router links.
pub const MAX_INTERNAL_FRAME: usize = 4 * 1024 * 1024;
/// Time a server has to answer a request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a request to a server failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LinkError {
    /// No live connection to that server.
    #[error("server {0} is not connected")]
    NotConnected(String),
    /// The request failed or timed out.
    #[error("request to server failed: {0}")]
    Failed(String),
}

/// Places for pushes that wait for room in a full push queue: at most `total` in all and
/// `per_server` for any one server.
struct WaitPlaces {
    taken: Arc<AtomicUsize>,
    total: usize,
    per_server: usize,
}

/// A push's place while it waits; given back when dropped.
struct WaitPlace {
    taken: Arc<AtomicUsize>,
    server_taken: Arc<AtomicUsize>,
}

impl WaitPlaces {
    fn new(total: usize, per_server: usize) -> Self {
        Self {
            taken: Arc::new(AtomicUsize::new(0)),
            total,
            per_server,
        }
    }

    /// A place for one more push waiting for a server whose own count is `server_taken`, or
    /// `None` when that server or all of them together hold their most.
    fn take(&self, server_taken: &Arc<AtomicUsize>) -> Option<WaitPlace> {
        if server_taken.fetch_add(1, Ordering::Relaxed) >= self.per_server {
            server_taken.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        if self.taken.fetch_add(1, Ordering::Relaxed) >= self.total {
            self.taken.fetch_sub(1, Ordering::Relaxed);
            server_taken.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(WaitPlace {
            taken: self.taken.clone(),
            server_taken: server_taken.clone(),
        })
    }
}

impl Drop for WaitPlace {
    fn drop(&mut self) {
        self.taken.fetch_sub(1, Ordering::Relaxed);
        self.server_taken.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One server's push queue and the count of pushes waiting for room in it.
#[derive(Clone)]
struct Pusher {
    queue: mpsc::Sender<Measured<Push>>,
    waiting: Arc<AtomicUsize>,
    /// Encoded bytes of this server's pushes queued or waiting ([`MAX_QUEUED_PUSH_BYTES`]).
    queued_bytes: Arc<AtomicUsize>,
}

impl Pusher {
    /// Counts `len` more bytes queued, unless that would pass [`MAX_QUEUED_PUSH_BYTES`].
    fn charge(&self, len: usize) -> bool {
        if self.queued_bytes.fetch_add(len, Ordering::Relaxed) + len > MAX_QUEUED_PUSH_BYTES {
            self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Takes back bytes [`Pusher::charge`] counted for a push that never reached the queue.
    fn refund(&self, len: usize) {
        self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
    }
}

/// Connections to servers, by server id.
pub struct ServerLinks {
    endpoint: quinn::Endpoint,
    /// One batching pusher per server.
    pushers: std::sync::Mutex<HashMap<String, Pusher>>,
    /// Places for pushes waiting for room in a full queue.
    waiting: WaitPlaces,
    /// Pushes dropped because too many waited.
    dropped: AtomicU64,
    /// Each server's link: its connection, or `None` once it went down and is not back (until
    /// the server leaves discovery). A server not in it has not been linked yet.
    conns: RwLock<HashMap<String, Option<quinn::Connection>>>,
    /// Client messages forwarded by each server (for the admin page's rates).
    forwarded: RwLock<HashMap<String, Arc<AtomicU64>>>,
}

impl ServerLinks {
    /// Links dialled from `endpoint` (whose default client config carries the router's client
    /// certificate).
    pub fn new(endpoint: quinn::Endpoint) -> Self {
        Self {
            endpoint,
            pushers: std::sync::Mutex::new(HashMap::new()),
            waiting: WaitPlaces::new(PUSHES_WAITING, PUSHES_WAITING_PER_SERVER),
            dropped: AtomicU64::new(0),
            conns: RwLock::new(HashMap::new()),
            forwarded: RwLock::new(HashMap::new()),
        }
    }

    /// Drops what is kept per server for `server_id`, which left: its push queue (its pusher
    /// ends once the pushes already queued have failed) and its forward count. Servers named
    /// after short-lived hosts would otherwise leave a task and a map entry each for good.
    pub(crate) fn forget(&self, server_id: &str) {
        self.pushers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(server_id);
        self.forwarded
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(server_id);
    }

    /// Client messages forwarded by `server_id` so far.
    pub fn forwarded(&self, server_id: &str) -> u64 {
        self.forwarded
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(server_id)
            .map_or(0, |n| n.load(Ordering::Relaxed))
    }

    fn forward_counter(&self, server_id: &str) -> Arc<AtomicU64> {
        if let Some(n) = self
            .forwarded
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(server_id)
        {
            return n.clone();
        }
        self.forwarded
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(server_id.to_string())
            .or_default()
            .clone()
    }

    fn conn(&self, server_id: &str) -> Option<quinn::Connection> {
        self.conns
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(server_id)
            .cloned()
            .flatten()
    }

    /// Whether this router's link to `server_id` went down and is not back: a server it has
    /// not linked yet (just started, still dialing) is not lost.
    pub fn link_lost(&self, server_id: &str) -> bool {
        matches!(
            self.conns
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(server_id),
            Some(None)
        )
    }

    /// Whether a live connection to `server_id` exists.
    pub fn is_connected(&self, server_id: &str) -> bool {
        self.conn(server_id)
            .is_some_and(|c| c.close_reason().is_none())
    }

    /// Records `server_id`'s link as `link`: a connection, or `None` for one that went down.
    fn set(&self, server_id: &str, link: Option<quinn::Connection>) {
        self.conns
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(server_id.to_string(), link);
    }

    /// Forgets `server_id`'s link (the server left or moved).
    fn unlink(&self, server_id: &str) {
        self.conns
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(server_id);
    }

    async fn call<R: ProstMessage + Default>(
        &self,
        server_id: &str,
        request: &RouterRequest,
    ) -> Result<R, LinkError> {
        let conn = self
            .conn(server_id)
            .ok_or_else(|| LinkError::NotConnected(server_id.to_string()))?;
        match tokio::time::timeout(REQUEST_TIMEOUT, exchange(&conn, request)).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(e)) => Err(LinkError::Failed(e.to_string())),
            Err(_) => Err(LinkError::Failed("timed out".into())),
        }
    }

    /// Queues `delivery` for `recipients` on one server. Pushes to a busy server are batched:
    /// while earlier batches are in flight, new pushes queue up and leave together. A full
    /// queue makes a task wait for room, so the caller (a sender's ack) never waits on it; at
    /// most [`PUSHES_WAITING`] wait ([`PUSHES_WAITING_PER_SERVER`] for one server), and past
    /// that the push is dropped (recipients pull).
    pub fn push(self: &Arc<Self>, server_id: &str, recipients: Vec<Recipient>, delivery: Delivery) {
        if recipients.len() > MAX_PUSH_RECIPIENTS {
            for part in recipients.chunks(MAX_PUSH_RECIPIENTS) {
                self.push(server_id, part.to_vec(), delivery.clone());
            }
            return;
        }
        let push = Push {
            recipients,
            delivery: Some(delivery),
        };
        let Some(pusher) = self.pusher(server_id) else {
            // No link and no queue: the server left (its routes are going). The recipients
            // pull what was stored when they log in again.
            tracing::debug!(server = %server_id, "no link to server; push skipped");
            return;
        };
        let len = push.encoded_len();
        if !pusher.charge(len) {
            self.count_drop(server_id);
            return;
        }
        match pusher.queue.try_send(Measured { item: push, len }) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(push)) => {
                let server_id = server_id.to_string();
                let Some(place) = self.waiting.take(&pusher.waiting) else {
                    pusher.refund(len);
                    self.count_drop(&server_id);
                    return;
                };
                tokio::spawn(async move {
                    let _place = place;
                    if pusher.queue.send(push).await.is_err() {
                        pusher.refund(len);
                        tracing::warn!(server = %server_id, "pusher stopped; recipients will pull");
                    }
                });
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                pusher.refund(len);
                tracing::warn!(server = %server_id, "pusher stopped; recipients will pull");
            }
        }
    }

    /// Counts a push dropped for want of room, logged at the 1st, 2nd, 4th, 8th... drop, not
    /// at every one.
    fn count_drop(&self, server_id: &str) {
        let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        if dropped.is_power_of_two() {
            tracing::warn!(server = %server_id, dropped, "push queues full; pushes dropped, recipients will pull");
        }
    }

    /// The push queue of `server_id`, started on first use while a link to it exists: one
    /// for a server that left would live on after [`ServerLinks::forget`].
    fn pusher(self: &Arc<Self>, server_id: &str) -> Option<Pusher> {
        let mut pushers = self.pushers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pusher) = pushers.get(server_id) {
            return Some(pusher.clone());
        }
        if !self.is_connected(server_id) {
            return None;
        }
        let (queue, rx) = mpsc::channel(PUSH_QUEUE);
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        tokio::spawn(run_pusher(
            self.clone(),
            server_id.to_string(),
            rx,
            queued_bytes.clone(),
        ));
        let pusher = Pusher {
            queue,
            waiting: Arc::new(AtomicUsize::new(0)),
            queued_bytes,
        };
        pushers.insert(server_id.to_string(), pusher.clone());
        Some(pusher)
    }

    /// Passes `notice` to `recipients` on a server (best effort, not stored).
    pub async fn notify(
        &self,
        server_id: &str,
        recipients: Vec<u64>,
        notice: Notice,
    ) -> Result<PushResult, LinkError> {
        let kind = match notice {
            Notice::Presence(presence) => router_request::Kind::Presence(PresencePush {
                recipients,
                presence: Some(presence),
            }),
            Notice::GroupChange(change) => router_request::Kind::GroupChange(GroupChangePush {
                recipients,
                change: Some(change),
            }),
            Notice::Control(kind) => router_request::Kind::Notice(NoticePush {
                recipients,
                notice: Some(ServerControl { kind: Some(kind) }),
            }),
        };
        self.call(server_id, &RouterRequest { kind: Some(kind) })
            .await
    }

    /// Ends a session on a server. Returns whether the server had it.
    pub async fn kick(
        &self,
        server_id: &str,
        user_id: u64,
        session_id: u64,
        reason: &str,
    ) -> Result<bool, LinkError> {
        let request = RouterRequest {
            kind: Some(router_request::Kind::Kick(KickUser {
                user_id,
                session_id,
                reason: reason.to_string(),
            })),
        };
        let reply: KickResult = self.call(server_id, &request).await?;
        Ok(reply.found)
    }
}

async fn exchange<R: ProstMessage + Default>(
    conn: &quinn::Connection,
    request: &RouterRequest,
) -> Result<R, transport::ExchangeError> {
    transport::exchange(conn, request, MAX_INTERNAL_FRAME).await
}

/// How long a server out of the discovery view keeps its link and routes while the link still
/// works. A server whose ZooKeeper session expired while it lived registers again within about
/// a second of its new session, and a router whose own session expired may read the listing
/// before the servers are back in it: without the wait, a ZooKeeper partition longer than the
/// session timeout removed every route (every user announced offline, then online again) and
/// dropped every link. A server that died loses its link within the link idle timeout (4 s),
/// before ZooKeeper drops it, so its departure is not delayed.
const DEPARTURE_GRACE: Duration = Duration::from_secs(10);

/// Tries at removing a departed server's routes (its routes lapse with their leases anyway).
const REMOVAL_ATTEMPTS: u32 = 3;

/// Whether two discovery entries are the same server process: same id, address and
/// incarnation.
fn same_process(a: &ServerInfo, b: &ServerInfo) -> bool {
    a.id == b.id && a.internal_addr == b.internal_addr && a.incarnation == b.incarnation
}

/// Keeps one link per server in the discovery view: dials new servers, drops links to servers
/// that left (after [`DEPARTURE_GRACE`] while the link works) or were replaced, and removes the
/// routes of servers that left or were replaced: a server id at a new address or with another
/// incarnation is a new process without the old one's sessions (their clients resume on it,
/// which brings their routes back, or log in again).
pub(crate) async fn maintain(service: Arc<Service>, shutdown: CancellationToken) {
    let mut view = service.servers.clone();
    let mut dialers: HashMap<String, (ServerInfo, JoinHandle<()>)> = HashMap::new();
    // Removals of departed servers' routes still running, by server id.
    let mut removals: HashMap<String, JoinHandle<()>> = HashMap::new();
    // Linked servers out of the view, by id, with when this loop first saw them out.
    let mut absent: HashMap<String, tokio::time::Instant> = HashMap::new();
    loop {
        removals.retain(|_, removal| !removal.is_finished());
        let servers = view.borrow_and_update().clone();
        absent.retain(|id, _| !servers.iter().any(|s| &s.id == id));
        let now = tokio::time::Instant::now();
        // Drop links to servers that left or were replaced.
        let gone: Vec<String> = dialers
            .iter()
            .filter(|(_, (info, _))| !servers.iter().any(|s| same_process(s, info)))
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            let replaced = servers.iter().any(|s| s.id == id);
            if !replaced {
                let since = *absent.entry(id.clone()).or_insert(now);
                if now < since + DEPARTURE_GRACE && service.links.is_connected(&id) {
                    continue;
                }
                absent.remove(&id);
            }
            if let Some((_, task)) = dialers.remove(&id) {
                task.abort();
            }
            if let Some(conn) = service.links.conn(&id) {
                conn.close(
                    cim_core::close::code(cim_core::close::NORMAL),
                    b"server left",
                );
            }
            service.links.unlink(&id);
            service.links.forget(&id);
            // Off this loop, which meanwhile goes on linking other servers.
            let service = service.clone();
            let key = id.clone();
            let removal = tokio::spawn(async move {
                // A store blip must not leave the departed server's users online (and
                // unannounced) until their leases run out: a few tries, a second apart.
                for attempt in 1..=REMOVAL_ATTEMPTS {
                    match service.store.remove_server_routes(&id).await {
                        Ok(users) => {
                            tracing::info!(server = %id, replaced, routes = users.len(), "server left; routes removed");
                            service
                                .config
                                .metrics
                                .departed_routes
                                .inc_by(users.len() as u64);
                            for user in users {
                                service.announce_presence(user, false);
                            }
                            return;
                        }
                        Err(e) => {
                            tracing::warn!(server = %id, attempt, error = %e, "could not remove routes of departed server")
                        }
                    }
                    if attempt < REMOVAL_ATTEMPTS {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            });
            removals.insert(key, removal);
        }
        for server in servers.iter() {
            if !dialers.contains_key(&server.id) {
                // A server back from a departure is linked (and renews its sessions over the
                // link) only once the removal of its routes is done: else the removal could
                // delete the routes the renewal restores.
                let removal = removals.remove(&server.id);
                let (service, server_info, shutdown) =
                    (service.clone(), server.clone(), shutdown.clone());
                let task = tokio::spawn(async move {
                    if let Some(removal) = removal {
                        let _ = removal.await;
                    }
                    dial(service, server_info, shutdown).await;
                });
                dialers.insert(server.id.clone(), (server.clone(), task));
            }
        }
        // A server waiting out its grace is looked at again each second (its link may go).
        let recheck = async {
            if absent.is_empty() {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            changed = view.changed() => if changed.is_err() { break },
            _ = recheck => {}
        }
    }
    for (_, (_, task)) in dialers {
        task.abort();
    }
}

/// Dials one server until shutdown, serving its requests while connected.
async fn dial(service: Arc<Service>, server: ServerInfo, shutdown: CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let name = transport::server_name(&server.internal_addr);
        let attempt = match service.links.endpoint.connect(server.internal_addr, &name) {
            Ok(connecting) => connecting.await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match attempt {
            Ok(conn) => {
                backoff = Duration::from_millis(100);
                tracing::info!(server = %server.id, addr = %server.internal_addr, "linked to server");
                service.links.set(&server.id, Some(conn.clone()));
                tokio::select! {
                    _ = serve_server(&service, &server.id, &conn) => {}
                    _ = shutdown.cancelled() => {
                        conn.close(cim_core::close::code(cim_core::close::NORMAL), b"router shutting down");
                        return;
                    }
                }
                service.links.set(&server.id, None);
                tracing::info!(server = %server.id, reason = ?conn.close_reason(), "link to server lost");
            }
            Err(e) => {
                tracing::debug!(server = %server.id, error = %e, "dial failed");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Answers the requests a server opens on its link.
async fn serve_server(service: &Arc<Service>, server_id: &str, conn: &quinn::Connection) {
    let forwarded = service.links.forward_counter(server_id);
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        let forwarded = forwarded.clone();
        let service = service.clone();
        let server_id = server_id.to_string();
        tokio::spawn(async move {
            let request: ServerRequest = match read_only_frame(&mut recv, MAX_INTERNAL_FRAME).await
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(server = %server_id, error = %e, "bad server request");
                    let _ = send.reset(cim_core::close::code(cim_core::close::PROTOCOL));
                    return;
                }
            };
            let written = match request.kind {
                // The link's own server id is authoritative, not the one in the body.
                Some(server_request::Kind::SessionOpened(open)) => {
                    let reply =
                        session_opened(&service, &server_id, open.user_id, open.session_id).await;
                    write_frame(&mut send, &reply, MAX_INTERNAL_FRAME).await
                }
                Some(server_request::Kind::SessionsOpened(batch)) => {
                    let reply = each_session(&batch.sessions, |s| {
                        session_opened(&service, &server_id, s.user_id, s.session_id)
                    });
                    write_frame(&mut send, &reply.await, MAX_INTERNAL_FRAME).await
                }
                Some(server_request::Kind::SessionClosed(closed)) => {
                    let reply =
                        session_closed(&service, &server_id, closed.user_id, closed.session_id)
                            .await;
                    write_frame(&mut send, &reply, MAX_INTERNAL_FRAME).await
                }
                Some(server_request::Kind::SessionsClosed(batch)) => {
                    let reply = each_session(&batch.sessions, |s| {
                        session_closed(&service, &server_id, s.user_id, s.session_id)
                    });
                    write_frame(&mut send, &reply.await, MAX_INTERNAL_FRAME).await
                }
                Some(server_request::Kind::Forward(forward)) => {
                    let Some(message) = forward.message else {
                        let _ = send.reset(cim_core::close::code(cim_core::close::PROTOCOL));
                        return;
                    };
                    forwarded.fetch_add(1, Ordering::Relaxed);
                    let sender = Sender {
                        id: forward.from_user,
                        name: forward.from_name,
                    };
                    let ack = service.send_from_server(&sender, &message).await;
                    write_frame(&mut send, &ack, MAX_INTERNAL_FRAME).await
                }
                Some(server_request::Kind::Fetch(fetch)) => {
                    let reply = match service
                        .fetch(
                            fetch.user_id,
                            fetch.after_seq,
                            fetch.trim_up_to,
                            fetch.limit,
                        )
                        .await
                    {
                        Ok(reply) => reply,
                        Err(e) => PullResult {
                            code: e.code().into(),
                            message: e.to_string(),
                            ..Default::default()
                        },
                    };
                    write_frame(&mut send, &reply, MAX_INTERNAL_FRAME).await
                }
                Some(server_request::Kind::Trim(trim)) => {
                    let acked: Vec<(u64, u64)> =
                        trim.acked.iter().map(|r| (r.user_id, r.seq)).collect();
                    let reply = match service.trim(&acked).await {
                        Ok(()) => SessionResult::default(),
                        Err(e) => failure_result(&e),
                    };
                    write_frame(&mut send, &reply, MAX_INTERNAL_FRAME).await
                }
                Some(server_request::Kind::Forwards(batch)) => {
                    forwarded.fetch_add(batch.forwards.len() as u64, Ordering::Relaxed);
                    let sends = batch.forwards.into_iter().map(|forward| {
                        let service = service.clone();
                        async move {
                            let Some(message) = forward.message else {
                                return SendAck {
                                    code: "bad_request".into(),
                                    message: "forward without a message".into(),
                                    ..Default::default()
                                };
                            };
                            let sender = Sender {
                                id: forward.from_user,
                                name: forward.from_name,
                            };
                            service.send_from_server(&sender, &message).await
                        }
                    });
                    let acks = join_all(sends).await;
                    write_frame(&mut send, &ForwardBatchResult { acks }, MAX_INTERNAL_FRAME).await
                }
                Some(server_request::Kind::Group(command)) => {
                    let reply = group_command(&service, command.user_id, command.request).await;
                    write_frame(&mut send, &reply, MAX_INTERNAL_FRAME).await
                }
                Some(server_request::Kind::Renew(renew)) => {
                    let sessions: Vec<RenewedSession> = renew
                        .sessions
                        .iter()
                        .map(|s| RenewedSession {
                            user: s.user_id,
                            session: s.session_id,
                            told_up_to: s.told_up_to,
                        })
                        .collect();
                    let renewed = match service.renew_sessions(&server_id, &sessions).await {
                        Ok(renewed) => renewed,
                        Err(e) => {
                            // No verdict: the server keeps its sessions and retries later.
                            tracing::warn!(server = %server_id, error = ?e, "could not renew routes");
                            let _ = send.reset(cim_core::close::code(cim_core::close::OVERLOAD));
                            return;
                        }
                    };
                    let reply = RenewResult {
                        lost_users: renewed.lost,
                        behind: renewed
                            .behind
                            .into_iter()
                            .map(|(user_id, last_seq)| InboxHead { user_id, last_seq })
                            .collect(),
                    };
                    write_frame(&mut send, &reply, MAX_INTERNAL_FRAME).await
                }
                None => {
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

/// Runs a client's in-band group request.
async fn group_command(
    service: &Service,
    user: u64,
    request: Option<cim_proto::v1::GroupRequest>,
) -> GroupResult {
    let Some(request) = request else {
        return GroupResult {
            code: "bad_request".into(),
            message: "missing group request".into(),
            ..Default::default()
        };
    };
    let name = request.name.as_str();
    let op = group_request::Op::try_from(request.op).unwrap_or(group_request::Op::Mine);
    let outcome = match op {
        group_request::Op::Create => service
            .create_group(user, name, request.invite_only)
            .await
            .map(|()| GroupResult {
                invite_only: request.invite_only,
                ..Default::default()
            }),
        group_request::Op::Join => service
            .join_group(user, name)
            .await
            .map(|()| GroupResult::default()),
        group_request::Op::Leave => service
            .leave_group(user, name)
            .await
            .map(|()| GroupResult::default()),
        // `done`: an older router answers these as MINE, which its client must not take for
        // a change made.
        group_request::Op::Invite => service
            .invite(user, name, request.user_id)
            .await
            .map(|()| done()),
        group_request::Op::Remove => service
            .remove_member(user, name, request.user_id)
            .await
            .map(|()| done()),
        group_request::Op::Transfer => service
            .transfer_group(user, name, request.user_id)
            .await
            .map(|()| done()),
        group_request::Op::Members => {
            service
                .group_members(user, name)
                .await
                .map(|members| GroupResult {
                    members: members
                        .into_iter()
                        .map(|m| GroupMember {
                            user_id: m.id,
                            name: m.name,
                            online: m.online,
                            owner: m.owner,
                        })
                        .collect(),
                    ..Default::default()
                })
        }
        group_request::Op::Mine => service.my_groups(user).await.map(|mine| GroupResult {
            groups: mine.groups,
            invitations: mine.invitations,
            ..Default::default()
        }),
    };
    outcome.unwrap_or_else(|e| GroupResult {
        code: e.code().into(),
        message: e.to_string(),
        ..Default::default()
    })
}

/// The answer to an owner's change (INVITE, REMOVE, TRANSFER): `done`, which an older router,
/// answering such ops as MINE, leaves unset for its client to tell.
fn done() -> GroupResult {
    GroupResult {
        done: true,
        ..Default::default()
    }
}

/// Answers a batch of session reports: `answer` for each, side by side, the results in order.
async fn each_session<S, F, Fut>(sessions: &[S], answer: F) -> SessionBatchResult
where
    F: FnMut(&S) -> Fut,
    Fut: std::future::Future<Output = SessionResult>,
{
    SessionBatchResult {
        results: join_all(sessions.iter().map(answer)).await,
    }
}

/// Confirms the route of a session `server_id` reports opened, and tells the user's contacts
/// it is online.
async fn session_opened(
    service: &Service,
    server_id: &str,
    user_id: u64,
    session_id: u64,
) -> SessionResult {
    match service.session_opened(user_id, session_id, server_id).await {
        Ok(true) => {
            service.announce_presence(user_id, true);
            // Read after the route was confirmed: every later entry is pushed to the session.
            // Unknown, the client pulls to catch up.
            let inbox_caught_up_to = match service.inbox_caught_up_to(user_id).await {
                Ok(seq) => seq,
                Err(e) => {
                    tracing::debug!(error = %e, "inbox state unread");
                    None
                }
            };
            SessionResult {
                inbox_caught_up_to,
                ..Default::default()
            }
        }
        Ok(false) => SessionResult {
            code: cim_proto::SESSION_REPLACED.into(),
            message: "this login was replaced or has expired; log in again".into(),
            ..Default::default()
        },
        Err(e) => failure_result(&e),
    }
}

/// Releases the route of a session `server_id` reports closed, and tells the user's contacts
/// it is offline if that was the user's route.
async fn session_closed(
    service: &Service,
    server_id: &str,
    user_id: u64,
    session_id: u64,
) -> SessionResult {
    match service.session_closed(server_id, user_id, session_id).await {
        Ok(released) => {
            if released {
                service.announce_presence(user_id, false);
            }
            SessionResult::default()
        }
        Err(e) => failure_result(&e),
    }
}

/// The answer to a session report or inbox trim the service could not handle.
fn failure_result(e: &ServiceError) -> SessionResult {
    SessionResult {
        code: e.code().into(),
        message: e.to_string(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_servers_queued_pushes_are_capped_in_bytes() {
        let (queue, _pushes) = mpsc::channel(1);
        let pusher = Pusher {
            queue,
            waiting: Arc::default(),
            queued_bytes: Arc::default(),
        };
        assert!(pusher.charge(MAX_QUEUED_PUSH_BYTES - 10));
        assert!(!pusher.charge(11), "past the cap");
        assert!(pusher.charge(10), "a refused charge took nothing");
        pusher.refund(10);
        assert!(pusher.charge(10));
    }

    #[test]
    fn a_restarted_server_is_another_process_even_at_the_same_address() {
        let before = ServerInfo {
            id: "s1".into(),
            client_addr: "127.0.0.1:1000".parse().unwrap(),
            internal_addr: "127.0.0.1:2000".parse().unwrap(),
            load: 3,
            incarnation: 7,
        };
        let reloaded = ServerInfo {
            load: 9,
            ..before.clone()
        };
        assert!(same_process(&before, &reloaded), "only its load changed");
        let restarted = ServerInfo {
            incarnation: 8,
            ..before.clone()
        };
        assert!(!same_process(&before, &restarted));
        let moved = ServerInfo {
            internal_addr: "127.0.0.1:2001".parse().unwrap(),
            ..before.clone()
        };
        assert!(!same_process(&before, &moved));
    }

    #[test]
    fn a_server_that_fills_its_wait_places_leaves_the_rest_to_others() {
        let places = WaitPlaces::new(5, 3);
        let hung = Arc::new(AtomicUsize::new(0));
        let held: Vec<WaitPlace> = (0..3).filter_map(|_| places.take(&hung)).collect();
        assert_eq!(held.len(), 3);
        assert!(places.take(&hung).is_none(), "past its own share");
        assert_eq!(hung.load(Ordering::Relaxed), 3);

        let other = Arc::new(AtomicUsize::new(0));
        let first = places.take(&other).expect("room left for another server");
        let second = places.take(&other).expect("room left for another server");
        assert!(places.take(&other).is_none(), "past the total");
        assert_eq!(
            other.load(Ordering::Relaxed),
            2,
            "a refused place is not counted"
        );

        drop(first);
        drop(held);
        assert_eq!(hung.load(Ordering::Relaxed), 0);
        assert_eq!(places.taken.load(Ordering::Relaxed), 1);
        assert!(
            places.take(&hung).is_some(),
            "given-back places are free again"
        );
        drop(second);
    }
}
