//! Client sessions: control-stream login and heartbeat, one task per message stream, and
//! delivery of pushed messages on server-opened streams.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use cim_core::limit::TokenBucket;
use cim_core::token::Claims;
use cim_core::transport::{CLIENT_STREAMS_BUSY, StreamAllowance, take_end};
use cim_core::{close, now_ms};
use cim_proto::v1::{
    ChatMessage, ClientControl, ClientRequest, Delivery, Drain, Forward, GroupResult, Kick,
    LoginResult, Pong, PullResult, Recipient, SendAck, ServerControl, TokenRenewal, client_control,
    client_request, server_control,
};
use cim_proto::{
    FrameError, SharedDelivery, encode_frame, encode_frame_into, read_frame, read_required,
    write_frame,
};
use futures_util::{FutureExt, StreamExt};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::ServerConfig;
use crate::links::{LinkError, RouterLinks};
use crate::mailbox::{self, mailbox};
use crate::outbox::{Outbox, Queued, QueuedMessage};

/// Largest control frame (a login carries a token of at most 2 KiB).
const MAX_CONTROL_FRAME: usize = 4 * 1024;
/// Time a new connection has to open its control stream and log in.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Time given to a kicked client to read the Kick before the connection closes.
const KICK_LINGER: Duration = Duration::from_secs(2);
/// Longest a closing client's trim may hold up its control stream (the client waits a
/// second for the pong, then closes anyway).
const CLOSING_TRIM_TIMEOUT: Duration = Duration::from_secs(1);
/// Most pull and group requests of one session served at once; more wait their turn (each
/// holds a reply of up to [`MAX_PULL_FRAME`] until the client reads it).
const FETCHES_IN_FLIGHT: usize = 4;
/// Pings a session may send per second. A client pings once a heartbeat interval
/// (at least 100 ms apart: it clamps what the server asks for) and once more as it closes;
/// a session past this is flooding its control stream and is closed.
const PINGS_PER_SEC: u32 = 20;
/// Pings a session may send at once (see [`PINGS_PER_SEC`]).
const PING_BURST: u32 = 40;

/// What the server can tell a session's control stream from outside.
#[derive(Debug)]
enum ControlOut {
    Kick(String),
    Drain(String),
    /// A best-effort notice: a presence or group change.
    Notice(Box<server_control::Kind>),
}

#[derive(Clone)]
struct Session {
    session_id: u64,
    conn: quinn::Connection,
    control: mailbox::Sender<ControlOut>,
    outbox: Arc<Outbox>,
}

/// Shared state of one server: configuration, local sessions, router links.
pub(crate) struct State {
    pub(crate) config: Arc<ServerConfig>,
    pub(crate) links: RouterLinks,
    sessions: Mutex<HashMap<u64, Session>>,
    emptied: Notify,
    /// Highest inbox seq each user acknowledged since the last trim report.
    acked: Mutex<HashMap<u64, u64>>,
    /// Client connections admitted.
    connections: Mutex<Admitted>,
    /// Set once the server drains: new logins are refused, so clients go to the router.
    draining: AtomicBool,
    /// Close reports on their way to a router, per user (see [`State::close_for_report`]).
    closing: Mutex<HashMap<u64, Closes>>,
    /// Woken whenever a close report is answered.
    close_answered: Notify,
}

/// One user's close reports: kept while any is on its way or a login of the user watches.
#[derive(Default)]
struct Closes {
    in_flight: usize,
    /// Reports answered since the entry was made.
    answered: u64,
    /// Logins of the user under way ([`CloseWatch`]).
    watchers: usize,
}

impl State {
    pub(crate) fn new(config: Arc<ServerConfig>) -> Self {
        Self {
            config,
            links: RouterLinks::default(),
            sessions: Mutex::new(HashMap::new()),
            emptied: Notify::new(),
            acked: Mutex::new(HashMap::new()),
            connections: Mutex::new(Admitted::default()),
            draining: AtomicBool::new(false),
            closing: Mutex::new(HashMap::new()),
            close_answered: Notify::new(),
        }
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Session>> {
        // A panic while holding this lock cannot leave the map half-updated: every critical
        // section is a single insert/remove/lookup.
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The confirmed sessions here, as `(user, session_id, told_up_to)` (see
    /// [`Outbox::told_up_to`]; a login still waiting for the router is left out: renewing its
    /// route could confirm a login the router is about to refuse).
    pub(crate) fn session_refs(&self) -> Vec<(u64, u64, u64)> {
        self.sessions()
            .iter()
            .filter(|(_, s)| !s.outbox.is_held())
            .map(|(user, s)| (*user, s.session_id, s.outbox.told_up_to()))
            .collect()
    }

    /// Whether `session_id` is `user`'s session here.
    pub(crate) fn has_session(&self, user: u64, session_id: u64) -> bool {
        self.sessions()
            .get(&user)
            .is_some_and(|s| s.session_id == session_id)
    }

    /// Tells `user`'s session `session_id` (if still here) that its inbox gave out entries up
    /// to `head` (see [`Outbox::behind`]).
    pub(crate) fn inbox_behind(&self, user: u64, session_id: u64, head: u64) {
        if let Some(session) = self.sessions().get(&user)
            && session.session_id == session_id
        {
            session.outbox.behind(head);
        }
    }

    pub(crate) fn session_count(&self) -> usize {
        self.sessions().len()
    }

    pub(crate) async fn wait_empty(&self) {
        loop {
            let notified = self.emptied.notified();
            if self.session_count() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Admits a connection from `ip` if the caps allow; the guard releases it. A connection
    /// from an address not `validated` yet (the client has not shown it receives packets sent
    /// there) is told to validate it first when such handshakes pile up or its address has used
    /// half its connections: a flood of spoofed first packets then holds a bounded number of
    /// places, and cannot fill another address's share.
    fn admit(
        self: &Arc<Self>,
        ip: std::net::IpAddr,
        validated: bool,
    ) -> Result<Admission, &'static str> {
        let limits = self.config.limits;
        let mut admitted = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        if admitted.total >= limits.max_connections {
            return Err("server connection limit reached");
        }
        let from_ip = admitted.per_ip.get(&ip).copied().unwrap_or(0);
        if from_ip >= limits.max_connections_per_ip {
            return Err("connection limit per address reached");
        }
        if !validated && must_validate(admitted.unvalidated, from_ip, &limits) {
            return Ok(Admission::ValidateFirst);
        }
        *admitted.per_ip.entry(ip).or_insert(0) += 1;
        admitted.total += 1;
        admitted.unvalidated += usize::from(!validated);
        self.config.metrics.connections.inc();
        Ok(Admission::Admitted(ConnectionGuard {
            state: self.clone(),
            ip,
            unvalidated: !validated,
        }))
    }

    /// Records that `user` has every inbox entry up to `seq`.
    pub(crate) fn record_ack(&self, user: u64, seq: u64) {
        if seq == 0 {
            return;
        }
        let mut acked = self.acked.lock().unwrap_or_else(|p| p.into_inner());
        let slot = acked.entry(user).or_insert(0);
        *slot = (*slot).max(seq);
    }

    /// Takes the acknowledgements recorded since the last call.
    pub(crate) fn take_acks(&self) -> Vec<(u64, u64)> {
        let mut acked = self.acked.lock().unwrap_or_else(|p| p.into_inner());
        acked.drain().collect()
    }

    /// Removes the session if it is still `session_id` on `conn` (a resumed session lives on
    /// a newer connection and must stay).
    fn remove(&self, user_id: u64, session_id: u64, conn: &quinn::Connection) -> bool {
        self.remove_and(user_id, session_id, conn, || {})
    }

    fn remove_and(
        &self,
        user_id: u64,
        session_id: u64,
        conn: &quinn::Connection,
        also: impl FnOnce(),
    ) -> bool {
        let mut sessions = self.sessions();
        let ours = sessions
            .get(&user_id)
            .is_some_and(|s| s.session_id == session_id && s.conn.stable_id() == conn.stable_id());
        if ours {
            sessions.remove(&user_id);
            also();
        }
        if sessions.is_empty() {
            self.emptied.notify_waiters();
        }
        ours
    }

    fn closing(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Closes>> {
        self.closing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// [`State::remove`] for a connection that ended, whose close the caller reports to a
    /// router: the report counts as on its way from the moment the session leaves the map (one
    /// critical section), until [`CloseReport`] drops. A login of the same user waits for such
    /// reports (see [`State::wait_closes`]), so a late one cannot release the route the login
    /// has just confirmed.
    fn close_for_report(
        self: &Arc<Self>,
        user_id: u64,
        session_id: u64,
        conn: &quinn::Connection,
    ) -> Option<CloseReport> {
        let mut report = None;
        self.remove_and(user_id, session_id, conn, || {
            report = Some(self.report_close(user_id, session_id));
        });
        report
    }

    /// Counts a close report of `session_id` of `user` as on its way until the returned report
    /// drops (for a session not in the map; [`State::close_for_report`] otherwise).
    fn report_close(self: &Arc<Self>, user: u64, session_id: u64) -> CloseReport {
        self.closing().entry(user).or_default().in_flight += 1;
        CloseReport {
            state: self.clone(),
            user,
            session_id,
        }
    }

    /// Waits until no close report of `user` is on its way. Returns how many of the user's
    /// reports `watch` has seen answered by then (see [`State::closes_since`]).
    async fn wait_closes(&self, watch: &CloseWatch<'_>) -> u64 {
        loop {
            let answered = self.close_answered.notified();
            tokio::pin!(answered);
            answered.as_mut().enable();
            match self.closing().get(&watch.user) {
                Some(closes) if closes.in_flight > 0 => {}
                Some(closes) => return closes.answered,
                // The watch keeps the entry; without one there is nothing to wait for.
                None => return 0,
            }
            answered.await;
        }
    }

    /// Whether a close report of the watched user is on its way, or one was answered after
    /// [`State::wait_closes`] returned `answered`.
    fn closes_since(&self, watch: &CloseWatch<'_>, answered: u64) -> bool {
        self.closing()
            .get(&watch.user)
            .is_none_or(|c| c.in_flight > 0 || c.answered != answered)
    }

    /// Keeps the bookkeeping of `user`'s close reports while a login of theirs is under way.
    fn watch_closes(&self, user: u64) -> CloseWatch<'_> {
        self.closing().entry(user).or_default().watchers += 1;
        CloseWatch { state: self, user }
    }

    /// One report of `user` answered or given up (see [`CloseReport`]) or one watch ended.
    fn forget_close(&self, user: u64, answered: bool) {
        let mut closing = self.closing();
        let Some(closes) = closing.get_mut(&user) else {
            return;
        };
        if answered {
            closes.in_flight = closes.in_flight.saturating_sub(1);
            closes.answered += 1;
        } else {
            closes.watchers = closes.watchers.saturating_sub(1);
        }
        if closes.in_flight == 0 && closes.watchers == 0 {
            closing.remove(&user);
        }
    }

    /// Ends the session of `user_id` (only `session_id` if non-zero). Returns whether one ended.
    pub(crate) fn kick(&self, user_id: u64, session_id: u64, reason: &str) -> bool {
        let removed = {
            let mut sessions = self.sessions();
            match sessions.get(&user_id) {
                Some(s) if session_id == 0 || s.session_id == session_id => {
                    sessions.remove(&user_id)
                }
                _ => None,
            }
        };
        match removed {
            Some(session) => {
                kick_session(session, reason);
                true
            }
            None => false,
        }
    }

    /// Passes a notice (a presence or group change) to local sessions (best effort: a session
    /// whose control stream is backed up misses it). Returns the recipients found.
    pub(crate) fn notify(&self, recipients: &[u64], notice: &server_control::Kind) -> Vec<u64> {
        let sessions = self.sessions();
        recipients
            .iter()
            .filter(|user| {
                sessions.get(user).is_some_and(|s| {
                    s.control
                        .try_send(ControlOut::Notice(Box::new(notice.clone())))
                        .is_ok()
                })
            })
            .copied()
            .collect()
    }

    /// Refuses new logins from now on (`draining`).
    pub(crate) fn refuse_logins(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Refuses new logins from now on and sends `Drain` to every session.
    pub(crate) fn drain_all(&self, reason: &str) {
        self.refuse_logins();
        self.drain_sessions(reason);
    }

    /// Sends `Drain` to every session (the server goes on taking logins).
    pub(crate) fn drain_sessions(&self, reason: &str) {
        let sessions: Vec<Session> = self.sessions().values().cloned().collect();
        for session in sessions {
            send_control(&session, ControlOut::Drain(reason.to_string()));
        }
    }

    /// Queues `delivery` for each recipient with a session here, with the recipient's own
    /// sequence number. Returns the recipients found and those absent. A failed delivery is not
    /// retried here: the entry stays in the inbox and the client pulls it.
    pub(crate) fn deliver(
        self: &Arc<Self>,
        recipients: &[Recipient],
        delivery: Delivery,
    ) -> (Vec<u64>, Vec<u64>) {
        let mut delivered = Vec::with_capacity(recipients.len());
        let mut absent = Vec::new();
        let message = QueuedMessage::new(
            SharedDelivery::new(delivery),
            &self.config.metrics.queued_bytes,
        );
        let push = |outbox: &Arc<Outbox>, user: u64, seq: u64| {
            let queued = Queued {
                seq,
                message: message.clone(),
            };
            if !outbox.push(queued, self) {
                self.config.metrics.delivery_failures.inc();
                tracing::debug!(user, "delivery queue full; the client pulls");
            }
        };
        // A big push (a broadcast, a large group) takes the outboxes out of the session map
        // and queues to them after letting go of it: logins, closes and kicks wait on the map.
        if recipients.len() > DELIVER_UNDER_LOCK {
            let mut outboxes = Vec::with_capacity(recipients.len());
            {
                let sessions = self.sessions();
                for recipient in recipients {
                    match sessions.get(&recipient.user_id) {
                        Some(session) => outboxes.push((session.outbox.clone(), recipient)),
                        None => absent.push(recipient.user_id),
                    }
                }
            }
            for (outbox, recipient) in outboxes {
                delivered.push(recipient.user_id);
                push(&outbox, recipient.user_id, recipient.seq);
            }
            return (delivered, absent);
        }
        let sessions = self.sessions();
        for recipient in recipients {
            let user = recipient.user_id;
            let Some(session) = sessions.get(&user) else {
                absent.push(user);
                continue;
            };
            delivered.push(user);
            push(&session.outbox, user, recipient.seq);
        }
        (delivered, absent)
    }
}

/// Most recipients of a push queued to while the session map is held (see
/// [`State::deliver`]).
const DELIVER_UNDER_LOCK: usize = 64;

/// Client connections admitted: per address, in all, and how many of them are handshakes
/// from addresses not validated yet.
#[derive(Default)]
struct Admitted {
    per_ip: HashMap<std::net::IpAddr, usize>,
    total: usize,
    unvalidated: usize,
}

/// Handshakes from unvalidated addresses under way past which new ones must validate their
/// address first (a QUIC Retry: one round trip, no state kept until the client answers it).
const MAX_UNVALIDATED_HANDSHAKES: usize = 256;

/// Whether a connection from an unvalidated address must validate it before it is admitted,
/// given the unvalidated handshakes under way and the connections its address holds.
fn must_validate(unvalidated: usize, from_ip: usize, limits: &crate::Limits) -> bool {
    unvalidated >= MAX_UNVALIDATED_HANDSHAKES || from_ip * 2 >= limits.max_connections_per_ip
}

/// What [`State::admit`] decided.
enum Admission {
    /// Admitted, holding a place until the guard drops.
    Admitted(ConnectionGuard),
    /// The client must validate its address first (answer with a Retry).
    ValidateFirst,
}

/// Holds one admitted connection's place in the counts.
pub(crate) struct ConnectionGuard {
    state: Arc<State>,
    ip: std::net::IpAddr,
    /// Counted among the unvalidated handshakes.
    unvalidated: bool,
}

impl ConnectionGuard {
    /// The handshake is over: the client has shown it receives packets at its address.
    fn handshake_done(&mut self) {
        if std::mem::take(&mut self.unvalidated) {
            let connections = &self.state.connections;
            connections
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .unvalidated -= 1;
        }
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.state.config.metrics.connections.dec();
        let mut admitted = self
            .state
            .connections
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        admitted.total -= 1;
        admitted.unvalidated -= usize::from(self.unvalidated);
        if let Some(n) = admitted.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                admitted.per_ip.remove(&self.ip);
            }
        }
    }
}

fn send_control(session: &Session, out: ControlOut) {
    let code = match &out {
        ControlOut::Drain(_) => close::DRAIN,
        _ => close::KICKED,
    };
    if session.control.try_send(out).is_err() {
        // The control task is gone or hopelessly behind: end the connection outright, with
        // the code that tells the client what the frame would have.
        session.conn.close(close::code(code), b"session ended");
    }
}

/// Tells a session taken out of the map that it has ended. Its control loop closes the
/// connection once the client has read the Kick (or after `KICK_LINGER`); should the loop be
/// stuck, the connection is closed anyway a little later: an ended login must not keep a
/// connection that sends as its user.
fn kick_session(session: Session, reason: &str) {
    send_control(&session, ControlOut::Kick(reason.to_string()));
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        let conn = session.conn;
        runtime.spawn(async move {
            tokio::time::sleep(KICK_LINGER * 2).await;
            conn.close(close::code(close::KICKED), b"kicked");
        });
    }
}

/// Accepts client connections until shutdown; one task per connection.
pub(crate) async fn accept_clients(
    endpoint: quinn::Endpoint,
    state: Arc<State>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => return,
            incoming = endpoint.accept() => match incoming {
                Some(i) => i,
                None => return,
            },
        };
        // Refuse new clients while draining: they should go to another server.
        if shutdown.is_cancelled() {
            incoming.refuse();
            continue;
        }
        let peer = incoming.remote_address();
        let address = cim_core::limit::address_key(peer.ip());
        let mut guard = match state.admit(address, incoming.remote_address_validated()) {
            Ok(Admission::Admitted(guard)) => guard,
            Ok(Admission::ValidateFirst) => {
                state.config.metrics.retried_connections.inc();
                // Cannot fail: only an unvalidated address is asked to validate.
                if let Err(e) = incoming.retry() {
                    e.into_incoming().refuse();
                }
                continue;
            }
            Err(why) => {
                state.config.metrics.refused_connections.inc();
                tracing::warn!(%peer, why, "connection refused");
                incoming.refuse();
                continue;
            }
        };
        let state = state.clone();
        // Boxed: what a task captures stays in its memory for the task's whole life, and a
        // `quinn::Incoming` (the client's first packet) is 384 bytes.
        let incoming = Box::new(incoming);
        tracker.spawn(
            async move {
                // One deadline from the first packet to the login result: quinn restarts its
                // idle timer on every packet, so a client that keeps a handshake going (or
                // never logs in) would otherwise hold its place for good.
                let deadline = tokio::time::Instant::now() + LOGIN_TIMEOUT;
                match tokio::time::timeout_at(deadline, *incoming).await {
                    Ok(Ok(conn)) => {
                        guard.handshake_done();
                        handle_client(conn, state, deadline).await;
                    }
                    Ok(Err(e)) => tracing::debug!(error = %e, "handshake failed"),
                    Err(_) => tracing::debug!("handshake not done in time"),
                }
            }
            .instrument(tracing::debug_span!("client", %peer)),
        );
    }
}

struct Authenticated {
    user_id: u64,
    user_name: String,
    session_id: u64,
    /// Expiry of the token the client logged in with.
    token_expires_at_ms: u64,
    /// Whether the client takes `TokenRenewal` frames.
    token_renewal: bool,
}

/// Serves one client connection: its login (done by `deadline`), then its session.
async fn handle_client(conn: quinn::Connection, state: Arc<State>, deadline: tokio::time::Instant) {
    // Boxed, so its state (about 1.2 KB) is freed once the login is done rather than kept
    // in the session task's memory.
    let login = tokio::time::timeout_at(deadline, Box::pin(login(&conn, &state))).await;
    let (auth, send, recv, control_rx, outbox) = match login {
        Ok(Ok(ok)) => ok,
        Ok(Err(reason)) => {
            tracing::info!(peer = %conn.remote_address(), %reason, "login refused");
            return;
        }
        Err(_) => {
            tracing::info!(peer = %conn.remote_address(), "no login in time");
            conn.close(close::code(close::TIMEOUT), b"login timeout");
            return;
        }
    };
    state.config.metrics.logins.inc();
    let span = tracing::info_span!("session", user = auth.user_id, session = auth.session_id);
    async {
        tracing::info!(name = %auth.user_name, "session opened");
        tokio::select! {
            _ = control_loop(&conn, &auth, send, recv, control_rx, &outbox, &state) => {}
            _ = message_loop(&conn, &auth, &state) => {}
        }
        // The loops may end with the connection still open (the client finished its control
        // stream, or a control write failed or timed out); its streams' tasks hold it, so it
        // must be closed here, or it would live on outside the session map and every limit.
        conn.close(close::code(close::NORMAL), b"session ended");
        if let Some(report) = state.close_for_report(auth.user_id, auth.session_id, &conn) {
            // Boxed: an exchange with the router is larger than the loops above, and the
            // task's memory is the largest of its states for the session's whole life.
            Box::pin(report.send()).await;
        }
        tracing::info!(reason = ?conn.close_reason(), "session closed");
    }
    .instrument(span)
    .await
}

type LoggedIn = (
    Authenticated,
    quinn::SendStream,
    quinn::RecvStream,
    mailbox::Receiver<ControlOut>,
    Arc<Outbox>,
);

/// Takes a login's session out of the session map again unless the login completes: a refused,
/// failed or timed-out login (its future dropped) must leave no session behind that takes pushes
/// or renews a route. One that fails after the router may have confirmed it (the client gone
/// before its login result, the login timed out, the router's answer lost) also reports the
/// close, so the router does not keep the user online on a route to no session.
struct Unconfirmed<'a> {
    state: &'a Arc<State>,
    user: u64,
    session_id: u64,
    conn: &'a quinn::Connection,
    armed: bool,
    report: bool,
}

impl Unconfirmed<'_> {
    /// Ends the login on the router's `answer` to its confirmation, telling the client why.
    /// The session leaves the map before the client hears it (a login right after the refusal
    /// must not find it there): on a refusal with no close report (the router holds no route
    /// for it), on a failure to get an answer with one (the router may have confirmed it).
    async fn refuse(
        mut self,
        send: &mut quinn::SendStream,
        answer: Result<cim_proto::v1::SessionResult, LinkError>,
    ) -> String {
        let conn = self.conn;
        match answer {
            Ok(refused) => {
                self.report = false;
                drop(self);
                refuse(conn, send, &refused.code, &refused.message, close::AUTH).await
            }
            Err(e) => {
                drop(self);
                let message = format!("cannot confirm session: {e}");
                let code = cim_proto::SEND_UNAVAILABLE;
                refuse(conn, send, code, &message, close::OVERLOAD).await
            }
        }
    }
}

impl Drop for Unconfirmed<'_> {
    fn drop(&mut self) {
        let (state, user, session_id) = (self.state, self.user, self.session_id);
        let report = match (self.armed, self.report) {
            (false, false) => None,
            (true, false) => {
                state.remove(user, session_id, self.conn);
                None
            }
            (true, true) => state.close_for_report(user, session_id, self.conn),
            // Waiting to replace another session of the user: the router may have confirmed
            // this one. Report it unless it is the session in the map (the same login on an
            // older connection, whose route it would release). The map is checked and the
            // report counted in one critical section, as in `close_for_report`, so a login of
            // the same session that comes in now waits for the report.
            (false, true) => {
                let sessions = state.sessions();
                (sessions.get(&user).map(|s| s.session_id) != Some(session_id))
                    .then(|| state.report_close(user, session_id))
            }
        };
        if let Some(report) = report
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(report.send());
        }
    }
}

/// A close report on its way to a router (see [`State::close_for_report`]); dropped once
/// answered, or given up.
struct CloseReport {
    state: Arc<State>,
    user: u64,
    session_id: u64,
}

impl CloseReport {
    /// Reports that the session's connection closed.
    async fn send(self) {
        let state = &self.state;
        let result = state
            .links
            .session_closed(self.user, self.session_id, &state.config.id)
            .await;
        // Unreported, the route lapses with its lease (no one renews it).
        match result {
            Err(e) => {
                tracing::warn!(user = self.user, error = %e, "could not report session close")
            }
            Ok(refused) if !refused.code.is_empty() => tracing::warn!(
                user = self.user,
                code = refused.code,
                message = refused.message,
                "a router could not record the session close"
            ),
            Ok(_) => {}
        }
    }
}

impl Drop for CloseReport {
    fn drop(&mut self) {
        self.state.forget_close(self.user, true);
        self.state.close_answered.notify_waiters();
    }
}

/// A login's hold on its user's close-report bookkeeping (see [`State::watch_closes`]).
struct CloseWatch<'a> {
    state: &'a State,
    user: u64,
}

impl Drop for CloseWatch<'_> {
    fn drop(&mut self) {
        self.state.forget_close(self.user, false);
    }
}

/// Runs the login exchange. On refusal the client has been told why and the connection closed.
async fn login(conn: &quinn::Connection, state: &Arc<State>) -> Result<LoggedIn, String> {
    let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
    let frame: Result<ClientControl, _> = read_required(&mut recv, MAX_CONTROL_FRAME).await;
    let login = match frame.map(|f| f.kind) {
        Ok(Some(client_control::Kind::Login(login))) => login,
        Ok(_) => {
            return Err(refuse(
                conn,
                &mut send,
                "protocol",
                "first frame must be Login",
                close::PROTOCOL,
            )
            .await);
        }
        Err(e) => {
            return Err(refuse(
                conn,
                &mut send,
                "bad_frame",
                &e.to_string(),
                close::PROTOCOL,
            )
            .await);
        }
    };
    if state.draining.load(Ordering::Relaxed) {
        let message = "server is shutting down; log in again through the router";
        return Err(refuse(conn, &mut send, "draining", message, close::DRAIN).await);
    }
    let claims = match state
        .config
        .token_key
        .verify(&login.token, now_ms(), Some(&state.config.id))
    {
        Ok(claims) => claims,
        Err(e) => return Err(refuse(conn, &mut send, e.code(), &e.to_string(), close::AUTH).await),
    };
    let (control_tx, control_rx) = mailbox(64);
    let outbox = Outbox::held(claims.user_id, conn.clone());
    let session = Session {
        session_id: claims.session_id,
        conn: conn.clone(),
        control: control_tx,
        outbox: outbox.clone(),
    };
    // With no other session of this user here, the new one goes into the map before the router
    // confirms it, so every push from then on reaches its outbox, held until the router has
    // confirmed the login (a push that fails leaves its entry in the inbox, as always). After
    // confirming the route, the router says whether the inbox is empty and its last seq: every
    // later entry is pushed here, so the client can continue from there without pulling.
    // Another session of the user is replaced only once the router has confirmed this login (a
    // revoked token must not kick anyone), and then the client is told nothing and pulls.
    let waiting = match state.sessions().entry(claims.user_id) {
        Entry::Vacant(slot) => {
            slot.insert(session);
            None
        }
        Entry::Occupied(occupant) => {
            let seen = (occupant.get().session_id, occupant.get().conn.stable_id());
            Some((session, seen))
        }
    };
    let mut in_map = Unconfirmed {
        state,
        user: claims.user_id,
        session_id: claims.session_id,
        conn,
        armed: waiting.is_none(),
        report: false,
    };
    // The reports of this user's connections that closed before go to the router first: one
    // answered after the confirmation below would release the route this login confirms.
    let watch = state.watch_closes(claims.user_id);
    let answered = state.wait_closes(&watch).await;
    in_map.report = true;
    // The router's confirmation of this login (asked again below when the map changed).
    let confirm = || {
        state
            .links
            .session_opened(claims.user_id, claims.session_id, &state.config.id)
    };
    let confirmed_seq = match confirm().await {
        Ok(result) if result.code.is_empty() => result.inbox_caught_up_to,
        answer => return Err(in_map.refuse(&mut send, answer).await),
    };
    let inbox_caught_up_to = match waiting {
        None => confirmed_seq,
        Some((session, mut seen)) => {
            // Another login of the user may have got into the map while the router confirmed
            // this one (a takeover from elsewhere, for which the router kicked the session
            // seen then). Only the router knows which of the two the route belongs to: it is
            // asked again before the newcomer is replaced, and a refusal refuses this login.
            // The same goes once if the session seen left the map meanwhile: it may have
            // closed, or the router may have kicked this very login (a logout, a takeover to
            // another server) after its confirmation was on its way, and a login it revoked
            // must not come in (it ran, sending as its user, until the next renewal). It goes
            // into the empty slot before it asks, so that a kick from then on finds it.
            let mut waiting = Some(session);
            let previous = loop {
                {
                    let mut sessions = state.sessions();
                    let current = sessions
                        .get(&claims.user_id)
                        .map(|s| (s.session_id, s.conn.stable_id()));
                    match (current, waiting.take()) {
                        (Some((id, conn)), still)
                            if id != claims.session_id && (id, conn) != seen =>
                        {
                            seen = (id, conn);
                            waiting = still;
                        }
                        // Into the empty slot; the answer below ends the loop.
                        (None, Some(session)) => {
                            sessions.insert(claims.user_id, session);
                            in_map.armed = true;
                        }
                        (_, Some(session)) => break sessions.insert(claims.user_id, session),
                        // Not reached: the login is in the map only after the arm above,
                        // whose answer ends the loop.
                        (_, None) => break None,
                    }
                }
                match confirm().await {
                    // In the map since before this answer, which confirmed it.
                    Ok(result) if result.code.is_empty() && waiting.is_none() => break None,
                    Ok(result) if result.code.is_empty() => {}
                    answer => return Err(in_map.refuse(&mut send, answer).await),
                }
            };
            in_map.armed = true;
            match previous {
                Some(previous) if previous.session_id != claims.session_id => {
                    kick_session(previous, "logged in elsewhere");
                }
                Some(previous) => {
                    // The same login reconnected (new path, 0-RTT resumption): it replaces its
                    // old connection without being told to go away.
                    previous
                        .conn
                        .close(close::code(close::NORMAL), b"session resumed elsewhere");
                }
                None => {}
            }
            // The session it replaced may have closed while the router confirmed this one, and
            // the router may have taken that report after the confirmation: confirm again once
            // it is answered (the router gives a released route back to a live session). No
            // later close of an older connection can be reported: this one is in the map now.
            if state.closes_since(&watch, answered) {
                state.wait_closes(&watch).await;
                match confirm().await {
                    Ok(result) if result.code.is_empty() => {}
                    // The login ended meanwhile (revoked): it must not go on. Another code (the
                    // router's store failed) says nothing about the login.
                    Ok(result) if result.code == cim_proto::SESSION_REPLACED => {
                        return Err(in_map.refuse(&mut send, Ok(result)).await);
                    }
                    Ok(result) => {
                        tracing::warn!(code = %result.code, "session not confirmed again")
                    }
                    Err(e) => tracing::warn!(error = %e, "session not confirmed again"),
                }
            }
            // Pushes since the router read the inbox may have gone to the old session.
            None
        }
    };
    if let Some(seq) = inbox_caught_up_to {
        // The client starts from there without pulling: the first renewal must not take its
        // whole inbox history for entries pushed to no one.
        outbox.caught_up_to(seq);
    }
    outbox.release(state);
    // A login that passed the draining check while the drain began may have been missed by
    // `drain_all`: it is told now (after its login result).
    if state.draining.load(Ordering::Relaxed)
        && let Some(session) = state.sessions().get(&claims.user_id).cloned()
    {
        send_control(&session, ControlOut::Drain("server shutting down".into()));
    }
    let result = ServerControl {
        kind: Some(server_control::Kind::LoginResult(LoginResult {
            code: String::new(),
            message: String::new(),
            user_id: claims.user_id,
            user_name: claims.user_name.clone(),
            server_id: state.config.id.clone(),
            heartbeat_interval_ms: state.config.heartbeat_interval.as_millis() as u64,
            inbox_caught_up_to,
            max_sends_per_stream: MAX_SENDS_PER_STREAM,
            max_body_bytes: u32::try_from(state.config.max_body_bytes).unwrap_or(u32::MAX),
        })),
    };
    if let Err(e) = write_frame(&mut send, &result, MAX_CONTROL_FRAME).await {
        // The session leaves the map (and its close is reported) with `in_map`; the connection
        // goes now, not when the last delivery stream holding it gives up.
        conn.close(close::code(close::NORMAL), b"login result not taken");
        return Err(e.to_string());
    }
    in_map.armed = false;
    in_map.report = false;
    let auth = Authenticated {
        user_id: claims.user_id,
        user_name: claims.user_name,
        session_id: claims.session_id,
        token_expires_at_ms: claims.expires_at_ms,
        token_renewal: login.token_renewal,
    };
    Ok((auth, send, recv, control_rx, outbox))
}

/// Tells the client why its login failed, then closes the connection. Returns the reason.
async fn refuse(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    code: &str,
    message: &str,
    close_code: u32,
) -> String {
    let reply = ServerControl {
        kind: Some(server_control::Kind::LoginResult(LoginResult {
            code: code.to_string(),
            message: message.to_string(),
            ..Default::default()
        })),
    };
    if write_frame(send, &reply, MAX_CONTROL_FRAME).await.is_ok() && send.finish().is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
    }
    conn.close(close::code(close_code), code.as_bytes());
    format!("{code}: {message}")
}

/// A fresh token for the session when the client's has less than half of `ttl` left: a live
/// session keeps a valid token for the router's HTTP API, for resuming here, and for
/// re-logging in without its password should this server die.
fn renewal(
    auth: &Authenticated,
    expires_at_ms: &mut u64,
    config: &ServerConfig,
    now_ms: u64,
) -> Option<TokenRenewal> {
    let ttl_ms = config.token_ttl.as_millis() as u64;
    if *expires_at_ms > now_ms.saturating_add(ttl_ms / 2) {
        return None;
    }
    *expires_at_ms = now_ms.saturating_add(ttl_ms);
    let token = config.token_key.sign(&Claims {
        user_id: auth.user_id,
        user_name: auth.user_name.clone(),
        server_id: config.id.clone(),
        session_id: auth.session_id,
        expires_at_ms: *expires_at_ms,
    });
    Some(TokenRenewal {
        token,
        expires_at_ms: *expires_at_ms,
    })
}

/// Sends the session a [`renewal`] if one is due and the client takes them.
async fn renew_if_due(
    auth: &Authenticated,
    expires_at_ms: &mut u64,
    send: &mut quinn::SendStream,
    state: &State,
) -> Result<(), FrameError> {
    if !auth.token_renewal {
        return Ok(());
    }
    if let Some(renewal) = renewal(auth, expires_at_ms, &state.config, now_ms()) {
        let limit = state.config.heartbeat_timeout;
        write_control(send, server_control::Kind::TokenRenewal(renewal), limit).await?;
        state.config.metrics.token_renewals.inc();
    }
    Ok(())
}

/// The frames of `recv` as a stream, for a `select!` loop: reading a frame is not
/// cancel-safe, so the read in progress lives in the stream, which every turn of the loop
/// polls, rather than in a branch it may drop. It ends after the stream's end (`Ok(None)`)
/// or a bad frame, and stays ended rather than panicking if polled again. Boxed: it holds a
/// read in progress, and the caller keeps it for a stream's whole life.
fn frame_stream<M>(
    recv: quinn::RecvStream,
    max_frame: usize,
    frame_timeout: Option<Duration>,
) -> std::pin::Pin<Box<impl futures_util::Stream<Item = Result<Option<M>, FrameError>>>>
where
    M: cim_proto::ProstMessage + Default,
{
    Box::pin(
        futures_util::stream::unfold(Some(recv), move |recv| async move {
            let mut recv = recv?;
            let read = read_frame::<M, _>(&mut recv, max_frame);
            let frame = match frame_timeout {
                Some(limit) => in_time(limit, read).await,
                None => read.await,
            };
            let more = matches!(frame, Ok(Some(_)));
            Some((frame, more.then_some(recv)))
        })
        .fuse(),
    )
}

/// Serves the control stream: pings, logout, token renewals, and kick/drain from the server
/// side. Returns when the session should end.
async fn control_loop(
    conn: &quinn::Connection,
    auth: &Authenticated,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
    mut control_rx: mailbox::Receiver<ControlOut>,
    outbox: &Outbox,
    state: &State,
) {
    // Checked now and at each ping, so a client resuming with an old token gets a fresh one
    // at once.
    let mut token_expires_at_ms = auth.token_expires_at_ms;
    // A client that reads nothing of its control stream for a heartbeat timeout is as gone
    // as one that sends nothing: a write blocked on it must not stop the loop from seeing
    // the heartbeat deadline or a kick.
    let limit = state.config.heartbeat_timeout;
    if renew_if_due(auth, &mut token_expires_at_ms, &mut send, state)
        .await
        .is_err()
    {
        return;
    }
    let mut frames = frame_stream::<ClientControl>(recv, MAX_CONTROL_FRAME, None);
    let mut closing_trimmed = false;
    let mut ping_acked = 0;
    let mut pings = TokenBucket::new(PING_BURST, PINGS_PER_SEC, std::time::Instant::now());
    let timeout = state.config.heartbeat_timeout;
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            frame = frames.next() => match frame {
                Some(Ok(Some(ClientControl { kind: Some(client_control::Kind::Ping(ping)) }))) => {
                    if !pings.try_take(std::time::Instant::now()) {
                        tracing::info!(user = auth.user_id, "ping flood: closing the session");
                        conn.close(close::code(close::OVERLOAD), b"ping rate limit exceeded");
                        break;
                    }
                    deadline.as_mut().reset(tokio::time::Instant::now() + timeout);
                    // Only a mark that moved is reported: every idle session's heartbeat would
                    // otherwise cost the store a trim.
                    let moved = ping.processed_up_to > ping_acked;
                    if moved {
                        ping_acked = ping.processed_up_to;
                    }
                    // A closing client waits for this pong: its last ack must be in the
                    // store before its user's next client pulls (once a session, as each
                    // costs a router call). Trimmed here, it is not reported again.
                    let trimmed = if ping.closing && !closing_trimmed && ping.processed_up_to > 0 {
                        closing_trimmed = true;
                        let acked = [(auth.user_id, ping.processed_up_to)];
                        match tokio::time::timeout(CLOSING_TRIM_TIMEOUT, state.links.trim(&acked)).await {
                            Ok(Ok(())) => true,
                            Ok(Err(e)) => {
                                tracing::debug!(error = %e, "closing trim failed; left to the ack report");
                                false
                            }
                            Err(_) => {
                                tracing::debug!("closing trim timed out; left to the ack report");
                                false
                            }
                        }
                    } else {
                        false
                    };
                    if moved && !trimmed {
                        state.record_ack(auth.user_id, ping.processed_up_to);
                    }
                    let pong = server_control::Kind::Pong(Pong {
                        nonce: ping.nonce,
                        missed_up_to: outbox.missed_up_to(),
                    });
                    if write_control(&mut send, pong, limit).await.is_err()
                        || renew_if_due(auth, &mut token_expires_at_ms, &mut send, state).await.is_err()
                    {
                        break;
                    }
                }
                Some(Ok(Some(ClientControl { kind: Some(client_control::Kind::Logout(_)) }))) => {
                    conn.close(close::code(close::NORMAL), b"logout");
                    break;
                }
                Some(Ok(Some(_))) => {
                    tracing::info!("unexpected control frame");
                    conn.close(close::code(close::PROTOCOL), b"unexpected control frame");
                    break;
                }
                Some(Err(e)) => {
                    tracing::info!(error = %e, "bad control frame");
                    conn.close(close::code(close::PROTOCOL), b"bad control frame");
                    break;
                }
                Some(Ok(None)) | None => break,
            },
            out = control_rx.recv() => match out {
                Some(ControlOut::Kick(reason)) => {
                    let kick = server_control::Kind::Kick(Kick { reason });
                    if write_control(&mut send, kick, KICK_LINGER).await.is_ok()
                        && send.finish().is_ok()
                    {
                        // Boxed for the same reason as `write_control`: it happens once.
                        let _ = Box::pin(tokio::time::timeout(KICK_LINGER, send.stopped())).await;
                    }
                    conn.close(close::code(close::KICKED), b"kicked");
                    break;
                }
                Some(ControlOut::Notice(notice)) => {
                    if write_control(&mut send, *notice, limit).await.is_err() {
                        break;
                    }
                }
                Some(ControlOut::Drain(reason)) => {
                    let drain = server_control::Kind::Drain(Drain { reason });
                    if write_control(&mut send, drain, limit).await.is_err() {
                        break;
                    }
                }
                None => break,
            },
            _ = &mut deadline => {
                tracing::info!("heartbeat timeout");
                conn.close(close::code(close::TIMEOUT), b"heartbeat timeout");
                break;
            }
        }
    }
}

fn control(kind: server_control::Kind) -> ServerControl {
    ServerControl { kind: Some(kind) }
}

/// Writes one control frame, failing if the client has not taken it within `limit`. The
/// message is encoded before the future starts, so the control loop, which lives as long as
/// the session, keeps only the encoded bytes across the write instead of room for the largest
/// message it sends.
fn write_control(
    send: &mut quinn::SendStream,
    kind: server_control::Kind,
    limit: Duration,
) -> impl Future<Output = Result<(), FrameError>> + '_ {
    let frame = encode_frame(&control(kind), MAX_CONTROL_FRAME);
    async move {
        let frame = frame?;
        // Boxed: the timer would otherwise take room in every session's control loop for
        // good, though a write is only a moment of it.
        match Box::pin(tokio::time::timeout(limit, send.write_all(&frame))).await {
            Ok(written) => Ok(written.map_err(std::io::Error::from)?),
            Err(_) => {
                tracing::info!("control stream left unread; ending the session");
                Err(std::io::Error::from(std::io::ErrorKind::TimedOut).into())
            }
        }
    }
}

/// Accepts one bidirectional stream per client message until the connection ends. Sends are
/// rate limited per session; a session that keeps sending far beyond its limit is
/// disconnected.
async fn message_loop(conn: &quinn::Connection, auth: &Authenticated, state: &Arc<State>) {
    let limits = state.config.limits;
    let shared = Arc::new(StreamLimits {
        bucket: Mutex::new(TokenBucket::new(
            limits.message_burst,
            limits.messages_per_sec,
            std::time::Instant::now(),
        )),
        refused_in_a_row: std::sync::atomic::AtomicU32::new(0),
        fetches: tokio::sync::Semaphore::new(FETCHES_IN_FLIGHT),
    });
    let flood_cap = limits.message_burst.saturating_mul(4).max(100);
    let mut allowance = StreamAllowance::default();
    while let Ok((send, recv)) = conn.accept_bi().await {
        if allowance.on_stream(std::time::Instant::now()) {
            tracing::debug!(user = auth.user_id, "busy client: stream allowance widened");
            conn.set_max_concurrent_bi_streams(quinn::VarInt::from_u32(CLIENT_STREAMS_BUSY));
        }
        let state = state.clone();
        let from_user = auth.user_id;
        let from_name = auth.user_name.clone();
        let shared = shared.clone();
        let conn = conn.clone();
        tokio::spawn(async move {
            let gate = RateGate {
                bucket: &shared.bucket,
                refused: &shared.refused_in_a_row,
                flood_cap,
                conn: &conn,
            };
            let fetches = &shared.fetches;
            let served = handle_message(send, recv, from_user, from_name, &state, gate, fetches);
            if let Err(e) = served.await {
                tracing::info!(user = from_user, error = %e, "message stream failed");
            }
        });
    }
}

/// What a session's message streams share: the send limit's state and the turns of fetches
/// (one allocation per session).
struct StreamLimits {
    bucket: Mutex<TokenBucket>,
    refused_in_a_row: std::sync::atomic::AtomicU32,
    fetches: tokio::sync::Semaphore,
}

/// The per-session send limit, checked when a send arrives.
struct RateGate<'a> {
    bucket: &'a Mutex<TokenBucket>,
    refused: &'a std::sync::atomic::AtomicU32,
    flood_cap: u32,
    conn: &'a quinn::Connection,
}

impl RateGate<'_> {
    /// Whether a request costing `cost` sends may go ahead. Past the flood cap the connection
    /// is closed.
    fn admit(&self, cost: u32) -> bool {
        use std::sync::atomic::Ordering;
        let ok = self
            .bucket
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .try_take_n(cost, std::time::Instant::now());
        if ok {
            self.refused.store(0, Ordering::Relaxed);
            return true;
        }
        let refused = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        if refused == self.flood_cap {
            tracing::warn!(remote = %self.conn.remote_address(), "flooding; disconnecting");
            self.conn
                .close(close::code(close::OVERLOAD), b"message rate limit exceeded");
        }
        false
    }
}

/// Time a client has for each frame on a message stream, the first counted from the stream's
/// opening: a stream left half-written would otherwise hold its frame's buffer (allocated
/// when the length arrives) and a task for as long as the session lives.
const MESSAGE_FRAME_TIMEOUT: Duration = Duration::from_secs(10);

/// `read` of a frame, failed as an I/O timeout (the stream is then reset) unless it is done
/// within `limit`.
async fn in_time<T>(
    limit: Duration,
    read: impl std::future::Future<Output = Result<T, FrameError>>,
) -> Result<T, FrameError> {
    tokio::time::timeout(limit, read).await.unwrap_or_else(|_| {
        Err(FrameError::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "frame not received in time",
        )))
    })
}

/// Why a message stream ended without an ack.
#[derive(Debug, thiserror::Error)]
enum MessageError {
    #[error("frame: {0}")]
    Frame(#[from] FrameError),
    #[error("stream: {0}")]
    Closed(#[from] quinn::ClosedStream),
    #[error("protocol: {0}")]
    Protocol(String),
}

/// Serves one stream a client opened: one request and its reply, or for sends up to
/// [`MAX_SENDS_PER_STREAM`] messages and an ack for each ([`send_messages`]).
async fn handle_message(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    from_user: u64,
    from_name: String,
    state: &State,
    gate: RateGate<'_>,
    fetches: &tokio::sync::Semaphore,
) -> Result<(), MessageError> {
    let max_frame = state.config.max_body_bytes + 256;
    let first = in_time(MESSAGE_FRAME_TIMEOUT, read_required(&mut recv, max_frame));
    let request: ClientRequest = match first.await {
        Ok(m) => m,
        Err(e @ FrameError::TooLarge { .. }) => {
            let why = frame_too_long(state.config.max_body_bytes);
            let ack = refused(0, cim_proto::TOO_LARGE, &why);
            write_acks(&mut send, &[ack]).await?;
            send.finish()?;
            return Err(e.into());
        }
        Err(e) => {
            let _ = send.reset(close::code(close::PROTOCOL));
            return Err(e.into());
        }
    };
    // Every request but a send is alone on its stream.
    match request.kind {
        Some(client_request::Kind::Send(message)) => {
            let from = Sender {
                user: from_user,
                name: from_name,
                gate,
            };
            return send_messages(send, recv, message, &from, state).await;
        }
        Some(client_request::Kind::Pull(pull)) => {
            if !gate.admit(1) {
                let reply = PullResult {
                    code: cim_proto::RATE_LIMITED.into(),
                    message: "too many requests; slow down".into(),
                    ..Default::default()
                };
                return write_reply(&mut send, &reply).await;
            }
            let _turn = fetches.acquire().await;
            let limit = pull.limit.clamp(1, MAX_PULL);
            let reply = match state.links.fetch(from_user, &pull, limit).await {
                Ok(reply) => reply,
                Err(e) => PullResult {
                    code: cim_proto::SEND_UNAVAILABLE.into(),
                    message: e.to_string(),
                    ..Default::default()
                },
            };
            write_reply(&mut send, &reply).await?;
        }
        Some(client_request::Kind::Group(request)) => {
            if !gate.admit(cim_core::limit::group_request_cost(&request)) {
                let reply = GroupResult {
                    code: cim_proto::RATE_LIMITED.into(),
                    message: "too many requests; slow down".into(),
                    ..Default::default()
                };
                return write_reply(&mut send, &reply).await;
            }
            let _turn = fetches.acquire().await;
            let reply = match state.links.group(from_user, request).await {
                Ok(reply) => reply,
                Err(e) => GroupResult {
                    code: cim_proto::SEND_UNAVAILABLE.into(),
                    message: e.to_string(),
                    ..Default::default()
                },
            };
            write_reply(&mut send, &reply).await?;
        }
        None => {
            let _ = send.reset(close::code(close::PROTOCOL));
            return Ok(());
        }
    }
    send.finish()?;
    take_end(&mut recv);
    Ok(())
}

/// The session a send stream belongs to.
struct Sender<'a> {
    user: u64,
    name: String,
    gate: RateGate<'a>,
}

/// Most messages one client stream may carry (told to clients at login). A client with
/// several sends queued puts them on one stream: one stream, one task and one FIN for all,
/// and the messages share datagrams.
pub(crate) const MAX_SENDS_PER_STREAM: u32 = 32;

/// Stores the messages of one send stream and writes an ack for each, in the order they
/// came. Each message goes to the router as soon as it is read, so they are stored side by
/// side rather than one after the other. A frame that is not a send, one send too many, an
/// undecodable frame or one over the size limit ends the stream: the messages before it are
/// stored and acked as usual, and the offending frame gets a refusal in its place (code
/// `protocol`, `malformed` or `too_large`, message id 0).
async fn send_messages(
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    first: ChatMessage,
    from: &Sender<'_>,
    state: &State,
) -> Result<(), MessageError> {
    let max_frame = state.config.max_body_bytes + 256;
    let store = |message: ChatMessage| async move {
        if !from.gate.admit(cim_core::limit::send_cost(&message)) {
            state.config.metrics.rate_limited.inc();
            return refused(
                message.client_msg_id,
                cim_proto::RATE_LIMITED,
                "too many messages; slow down",
            );
        }
        state.config.metrics.messages_in.inc();
        send_message(message, from.user, from.name.clone(), state).await
    };
    let mut frames = frame_stream::<ClientRequest>(recv, max_frame, Some(MESSAGE_FRAME_TIMEOUT));
    // Most streams carry one send, with the end of the stream in the same packet: then it is
    // stored and acked without the machinery for several. Otherwise what was read (if
    // anything) goes first.
    let early = match frames.next().now_or_never() {
        Some(Some(Ok(None)) | None) => {
            let mut send = send;
            write_acks(&mut send, &[store(first).await]).await?;
            send.finish()?;
            return Ok(());
        }
        Some(Some(frame)) => Some(frame),
        None => None,
    };
    let mut frames = futures_util::stream::iter(early).chain(frames);
    let mut acks = futures_util::stream::FuturesOrdered::new();
    acks.push_back(store(first));
    let mut sends = 1;
    let mut reading = true;
    let mut refusal: Option<(&str, String)> = None;
    // Acks are written by a future of their own, so that the sends behind them keep going to
    // the router while a client that reads its acks slowly holds the write up: a send that
    // stood still could hold a place in the server's forward queue for good. Acks that come
    // in meanwhile wait in `ready` and go out together with the next write.
    let mut ready: Vec<SendAck> = Vec::new();
    let mut idle: Option<quinn::SendStream> = Some(send);
    let mut writing: Option<AckWrite> = None;
    loop {
        if writing.is_none()
            && !ready.is_empty()
            && let Some(send) = idle.take()
        {
            writing = Some(write_acks_owned(send, std::mem::take(&mut ready)));
        }
        tokio::select! {
            Some(ack) = acks.next() => ready.push(ack),
            Some((send, written)) = futures_util::future::OptionFuture::from(writing.as_mut()),
                if writing.is_some() =>
            {
                writing = None;
                written?;
                idle = Some(send);
            }
            frame = frames.next(), if reading => match frame {
                Some(Ok(Some(ClientRequest { kind: Some(client_request::Kind::Send(message)) })))
                    if sends < MAX_SENDS_PER_STREAM =>
                {
                    sends += 1;
                    acks.push_back(store(message));
                }
                Some(Ok(None)) | None => reading = false,
                Some(Ok(Some(_))) => {
                    reading = false;
                    refusal = Some((
                        "protocol",
                        format!("a send stream carries only sends, at most {MAX_SENDS_PER_STREAM}"),
                    ));
                }
                Some(Err(e)) => {
                    reading = false;
                    let (code, why) = match e {
                        FrameError::TooLarge { .. } => {
                            (cim_proto::TOO_LARGE, frame_too_long(state.config.max_body_bytes))
                        }
                        FrameError::Decode(_) => ("malformed", e.to_string()),
                        // The client reset its side or the stream ended inside a frame: no
                        // one is reading.
                        FrameError::Truncated | FrameError::Io(_) => {
                            if let Some(mut send) = idle {
                                let _ = send.reset(close::code(close::PROTOCOL));
                            }
                            return Err(e.into());
                        }
                    };
                    refusal = Some((code, why));
                }
            },
            else => break,
        }
    }
    // Every ack is written (the loop ends only then): they reach the client before the
    // refusal and the end.
    let Some(mut send) = idle else {
        return Err(MessageError::Protocol("send stream lost".into()));
    };
    if let Some((code, why)) = refusal {
        write_acks(&mut send, &[refused(0, code, &why)]).await?;
        send.finish()?;
        return Err(MessageError::Protocol(why));
    }
    send.finish()?;
    Ok(())
}

/// Longest a client may leave its acks unread before its send stream is given up.
const ACK_WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Writing acks to a send stream; gives the stream back with the outcome.
type AckWrite =
    std::pin::Pin<Box<dyn Future<Output = (quinn::SendStream, Result<(), MessageError>)> + Send>>;

/// Writes `acks` in one go, giving up (and resetting the stream) after
/// [`ACK_WRITE_TIMEOUT`].
async fn write_acks(send: &mut quinn::SendStream, acks: &[SendAck]) -> Result<(), MessageError> {
    let mut frames = BytesMut::new();
    for ack in acks {
        encode_frame_into(ack, 1024, &mut frames)?;
    }
    match tokio::time::timeout(ACK_WRITE_TIMEOUT, send.write_chunk(frames.freeze())).await {
        Ok(result) => result.map_err(|e| FrameError::Io(e.into()).into()),
        Err(_) => {
            let _ = send.reset(close::code(close::TIMEOUT));
            Err(MessageError::Protocol("acks left unread".into()))
        }
    }
}

/// Writes a pull's or group request's reply, giving up (and resetting the stream) after
/// [`ACK_WRITE_TIMEOUT`]: a client that leaves it unread must not hold it, of up to
/// [`MAX_PULL_FRAME`], and its turn among the session's fetches for good.
async fn write_reply<M: cim_proto::ProstMessage>(
    send: &mut quinn::SendStream,
    reply: &M,
) -> Result<(), MessageError> {
    match tokio::time::timeout(ACK_WRITE_TIMEOUT, write_frame(send, reply, MAX_PULL_FRAME)).await {
        Ok(written) => Ok(written?),
        Err(_) => {
            let _ = send.reset(close::code(close::TIMEOUT));
            Err(MessageError::Protocol("reply left unread".into()))
        }
    }
}

/// [`write_acks`] as a future that owns the stream, for a `select!` loop that keeps going
/// while it runs.
fn write_acks_owned(mut send: quinn::SendStream, acks: Vec<SendAck>) -> AckWrite {
    Box::pin(async move {
        let written = write_acks(&mut send, &acks).await;
        (send, written)
    })
}

/// Most inbox entries returned by one pull.
const MAX_PULL: u32 = 200;
/// Largest pull reply: `MAX_PULL` bodies of at most 16 KiB plus headers.
const MAX_PULL_FRAME: usize = 4 * 1024 * 1024;

async fn send_message(
    message: ChatMessage,
    from_user: u64,
    from_name: String,
    state: &State,
) -> SendAck {
    if let Err((code, why)) = validate(&message, state.config.max_body_bytes) {
        return refused(message.client_msg_id, code, &why);
    }
    let client_msg_id = message.client_msg_id;
    let forward = Forward {
        from_user,
        from_name,
        message: Some(message),
    };
    match state.links.forward(forward).await {
        Ok(ack) => ack,
        Err(e) => {
            // The router may have stored the message before the link failed or timed out:
            // only a resend with the same id settles it.
            tracing::warn!(error = %e, "forward failed");
            refused(
                client_msg_id,
                cim_proto::SEND_RETRY,
                "no router answered; send again with the same client_msg_id",
            )
        }
    }
}

fn validate(message: &ChatMessage, max_body: usize) -> Result<(), (&'static str, String)> {
    if message.target.is_none() {
        return Err((cim_proto::BAD_REQUEST, "message has no recipient".into()));
    }
    if message.body.is_empty() {
        return Err((cim_proto::BAD_REQUEST, "message body is empty".into()));
    }
    if message.body.len() > max_body {
        return Err((
            cim_proto::TOO_LARGE,
            cim_proto::too_long(message.body.len(), max_body),
        ));
    }
    Ok(())
}

/// The refusal text for a frame too large to hold a body of at most `max_body` bytes (refused
/// on its length prefix, so the body's own length is not known).
fn frame_too_long(max_body: usize) -> String {
    format!("message too long: more than {max_body} bytes")
}

fn refused(client_msg_id: u64, code: &str, message: &str) -> SendAck {
    SendAck {
        client_msg_id,
        msg_id: 0,
        code: code.to_string(),
        message: message.to_string(),
        recipients: 0,
        recipient_online: None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use cim_core::token::TokenKey;

    #[test]
    fn unvalidated_addresses_validate_first_under_pressure() {
        let limits = crate::Limits {
            max_connections_per_ip: 10,
            ..Default::default()
        };
        assert!(!must_validate(0, 0, &limits));
        assert!(!must_validate(MAX_UNVALIDATED_HANDSHAKES - 1, 4, &limits));
        assert!(must_validate(MAX_UNVALIDATED_HANDSHAKES, 0, &limits));
        assert!(
            must_validate(0, 5, &limits),
            "half the address's share is used"
        );
    }

    #[test]
    fn a_token_is_renewed_once_less_than_half_its_lifetime_is_left() {
        let key = TokenKey::new(b"0123456789abcdef");
        let mut config = ServerConfig::new(
            "s1",
            "127.0.0.1:0".parse().unwrap(),
            "127.0.0.1:0".parse().unwrap(),
            "cert".into(),
            "key".into(),
            "ca".into(),
            key.clone(),
        );
        config.token_ttl = Duration::from_secs(600);
        let auth = Authenticated {
            user_id: 7,
            user_name: "alice".into(),
            session_id: 99,
            token_expires_at_ms: 0,
            token_renewal: true,
        };
        let now = 1_000_000;
        // 301 s left: not yet.
        let mut expires = now + 301_000;
        assert!(renewal(&auth, &mut expires, &config, now).is_none());
        assert_eq!(expires, now + 301_000);
        // 300 s left: a fresh token for the same login and this server, 600 s from now.
        let mut expires = now + 300_000;
        let fresh = renewal(&auth, &mut expires, &config, now).unwrap();
        assert_eq!(
            (expires, fresh.expires_at_ms),
            (now + 600_000, now + 600_000)
        );
        let claims = key.verify(&fresh.token, now, Some("s1")).unwrap();
        assert_eq!(
            (claims.user_id, claims.session_id, claims.user_name.as_str()),
            (7, 99, "alice")
        );
        assert_eq!(claims.expires_at_ms, now + 600_000);
        // And not again until half of the new lifetime has passed.
        assert!(renewal(&auth, &mut expires, &config, now + 299_000).is_none());
        assert!(renewal(&auth, &mut expires, &config, now + 300_000).is_some());
    }
}
