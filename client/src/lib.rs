//! cim client library: register and log in through a router over HTTPS, hold one QUIC
//! connection to the assigned server, send private and group messages, and receive messages
//! and session events as an async stream or through a [`MessageHandler`].
//!
//! Nothing is lost and nothing is seen twice: every message in a user's inbox has a sequence
//! number; the client hands messages to the application strictly in sequence order, drops
//! duplicates, pulls missing ranges, and on every (re)connect pulls everything after the last
//! sequence number it has (except after a first login whose result says the inbox held no
//! entries: the client continues from its last sequence number, and everything after that is
//! pushed to the new connection). Lost connections are re-established by the client itself: first a
//! QUIC resumption (0-RTT) to the same server with the same session, then a new login through
//! the router (jittered exponential backoff). Sends are retried with the same client message id
//! until acknowledged, and cim stores a retried message once.
//!
//! ```no_run
//! # async fn demo() -> Result<(), cim_client::ClientError> {
//! use cim_client::{Client, ClientConfig, Event, LoginOptions};
//! let config = ClientConfig::new("https://127.0.0.1:8443", std::fs::read("certs-dev/ca.pem").unwrap());
//! let (client, mut events) = Client::login(&config, "alice", "secret", LoginOptions::default()).await?;
//! client.send_group("all", "hello everyone").await?;
//! while let Some(event) = events.next().await {
//!     if let Event::Message(m) = event { println!("{}: {}", m.from_name, m.body); }
//! }
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use cim_core::pending::Pending;
use cim_core::transport::{self, Link, read_only_frame};
use cim_core::{ALPN_CLIENT, close, tls};
/// The group that reaches everyone online (CIM's group chat): `send_group(BROADCAST_GROUP, ..)`.
pub use cim_proto::BROADCAST_GROUP;
pub use cim_proto::v1::chat_message::Target;
use cim_proto::v1::{
    ChatMessage, ClientControl, ClientRequest, Delivery, DeliveryAck, DeliveryBatch, GroupRequest,
    GroupResult, Login, Ping, Pull, PullResult, ServerControl, client_control, client_request,
    group_request, server_control,
};
use cim_proto::{FrameError, read_frame, read_required, write_frame};
use tokio::sync::{Mutex as AsyncMutex, Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;

mod batch;
pub mod console;
pub mod history;
mod http;
mod presence;
pub mod receipts;
pub mod reorder;

use batch::{Carried, SendQueue};
pub use http::{
    BlockReply, BlockedUser, NamedUser, OnlinePage, OnlineUser, ReadReceipt, ReportReply,
    RouterApi, Settings,
};
use reorder::{Backoff, Reorder};

/// Largest control frame.
const MAX_CONTROL_FRAME: usize = 4 * 1024;
/// Largest pull reply.
const MAX_PULL_FRAME: usize = 4 * 1024 * 1024;
/// Time allowed for the QUIC handshake plus login exchange.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Pings after which a pong naming the same dropped deliveries asks for a pull again (a
/// minute at the default heartbeat).
const MISSED_REPULL_PINGS: u64 = 12;
/// Time one send attempt may take before it is retried.
pub(crate) const SEND_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a held-back delivery waits for the gap before it to fill before pulling.
const GAP_WAIT: Duration = Duration::from_millis(200);
/// Entries per pull.
const PULL_LIMIT: u32 = 200;
/// How long closing waits for the pong that says its last ack is in.
const ACK_FLUSH_WAIT: Duration = Duration::from_secs(1);
/// Send refusals that no attempt of the same message could have escaped (it is too large,
/// empty, to no one, or its id names another message): final even after an attempt that went
/// unanswered. Others (`not_member`, `unknown_group`) depend on what changed since.
const REFUSALS_OF_THE_MESSAGE: &[&str] = &[
    cim_proto::TOO_LARGE,
    cim_proto::BAD_REQUEST,
    cim_proto::UNKNOWN_USER,
    cim_proto::CLIENT_MSG_ID_REUSED,
];
/// Names [`Client::user_id_of`] keeps the ids of; past it, it starts again.
pub const MAX_USER_IDS_KEPT: usize = 4096;
/// Longest a close or logout waits for a reconnect under way to send the final ack.
const FINAL_ACK_RECONNECT_WAIT: Duration = Duration::from_secs(2);
/// Connect attempts of a first login.
const LOGIN_CONNECT_ATTEMPTS: u32 = 3;
/// Resume attempts against the same server before logging in again through the router. One:
/// a dead server answers nothing, so each attempt costs its whole timeout, while a re-login
/// with the session token costs the router no password hash, and the router answers
/// `session_live` (so the client tries resuming again) while the server still holds the
/// session (`bench/failover.sh`: with two 5 s attempts a dead server's clients were back
/// 10.2 s after they noticed, with one 5.1 s, with one of [`RESUME_TIMEOUT`] 2.1 s;
/// BENCHMARKS.md).
const RESUME_ATTEMPTS: u32 = 1;
/// How many times a password change is asked for when no answer comes: the router answers
/// a change asked again, once made, as done, so the client learns which password holds.
const PASSWORD_CHANGE_ATTEMPTS: u32 = 3;
/// How long the first resume attempt may take. Shorter than a first connect: the client has
/// just been talking to this server, a lost handshake packet is resent after about 0.3 s, and
/// if the server is only slow or out of reach the router sends the client back to resuming
/// (with a first connect's timeout from then on).
const RESUME_TIMEOUT: Duration = Duration::from_secs(2);
/// A connection that lasts this long (or a heartbeat interval, if longer) ends a streak of
/// short-lived ones (see [`supervise`]).
const MIN_STEADY_CONNECTION: Duration = Duration::from_secs(1);
/// Router answers to a token re-login after which only the password will do: the token
/// expired or is not genuine (`unauthorized`), its login ended (`session_ended`: logged
/// out, or already re-logged in by an attempt whose answer was lost), the account is gone, or
/// the router predates re-login (`not_found`). `logged_in_elsewhere` (another login replaced
/// this one) ends the client instead. Anything else (`session_live`: the router still sees
/// the session on a live server; `busy`, `no_server`, no answer) is retried with backoff, the
/// token again.
const TOKEN_REFUSALS: [&str; 4] = [
    "unauthorized",
    "session_ended",
    "invalid_credentials",
    "not_found",
];

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The router answered with an error.
    #[error("router refused ({status}): {code}: {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// Stable error code, e.g. `invalid_credentials`.
        code: String,
        /// Human-readable explanation.
        message: String,
    },
    /// The router could not be reached or answered garbage.
    #[error("router unreachable: {0}")]
    Http(String),
    /// The server refused the login.
    #[error("server refused login: {code}: {message}")]
    LoginRefused {
        /// Stable error code, e.g. `invalid_token`.
        code: String,
        /// Human-readable explanation.
        message: String,
    },
    /// The server refused a message (or, with `too_large`, the client did: a body too large
    /// for any frame a server reads is never sent). With code `retry` (returned only when
    /// reconnecting is off or the client message id is 0) the outcome is unknown: the message
    /// may still be stored and delivered.
    #[error("message refused: {code}: {message}")]
    SendRefused {
        /// Stable error code, e.g. `rate_limited`.
        code: String,
        /// Human-readable explanation.
        message: String,
    },
    /// The QUIC connection could not be made or was lost.
    #[error("connection: {0}")]
    Connection(String),
    /// The peer broke the protocol.
    #[error("protocol: {0}")]
    Protocol(String),
    /// Configuration is unusable (bad URL, bad CA file).
    #[error("configuration: {0}")]
    Config(String),
    /// An operation did not finish in time.
    #[error("timed out")]
    Timeout,
    /// No connection to a server came back in time, so nothing was sent (the client is
    /// reconnecting; try again).
    #[error("not connected to a server (reconnecting); nothing was sent")]
    NotConnected,
    /// The client was closed, logged out or kicked.
    #[error("client is closed")]
    Closed,
    /// A request (group operation) was refused.
    #[error("refused: {code}: {message}")]
    Refused {
        /// Stable error code, e.g. `group_full`.
        code: String,
        /// Human-readable explanation.
        message: String,
    },
}

impl ClientError {
    /// The stable error code, when the error carries one.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { code, .. }
            | ClientError::LoginRefused { code, .. }
            | ClientError::SendRefused { code, .. }
            | ClientError::Refused { code, .. } => Some(code),
            _ => None,
        }
    }

    /// Whether a failed send may still have been stored, and then delivered: it timed out, or
    /// its outcome was unknown to the cluster (code `retry`: no router answered its server, or
    /// the inbox append failed after the message id was recorded).
    pub fn send_outcome_unknown(&self) -> bool {
        matches!(self, ClientError::Timeout) || self.code() == Some(cim_proto::SEND_RETRY)
    }

    /// The same error again, for each of several sends it ended (the variants that carry
    /// nothing else keep their kind; the others become their message).
    pub(crate) fn duplicate(&self) -> ClientError {
        match self {
            ClientError::Timeout => ClientError::Timeout,
            ClientError::NotConnected => ClientError::NotConnected,
            ClientError::Closed => ClientError::Closed,
            ClientError::Protocol(m) => ClientError::Protocol(m.clone()),
            other => ClientError::Connection(other.to_string()),
        }
    }
}

impl From<FrameError> for ClientError {
    fn from(e: FrameError) -> Self {
        ClientError::Protocol(e.to_string())
    }
}

impl From<quinn::ConnectionError> for ClientError {
    fn from(e: quinn::ConnectionError) -> Self {
        ClientError::Connection(e.to_string())
    }
}

impl From<quinn::ClosedStream> for ClientError {
    fn from(e: quinn::ClosedStream) -> Self {
        ClientError::Connection(e.to_string())
    }
}

/// How to reach cim.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Router base URL, e.g. `https://127.0.0.1:8443`.
    pub router_url: String,
    /// PEM of the CA that signed the router and server certificates.
    pub ca_pem: Vec<u8>,
    /// Connect to another address instead of the server address the router returns (for a
    /// relay or a NAT); TLS still verifies the server's own name.
    pub server_overrides: HashMap<SocketAddr, SocketAddr>,
    /// Local address of the QUIC socket.
    pub bind_addr: SocketAddr,
    /// Declare the server dead if no pong arrives for this long (default: three heartbeat
    /// intervals as announced by the server).
    pub heartbeat_timeout: Option<Duration>,
    /// Re-establish lost connections automatically (default). Without it, the session ends
    /// at the first `Disconnected`.
    pub reconnect: bool,
    /// How long a send keeps retrying (across reconnects) before giving up.
    pub send_timeout: Duration,
    /// Longest one call to the router's HTTPS API (login, re-login, register, ...) may take,
    /// connecting included.
    pub http_timeout: Duration,
    /// Reconnect backoff: first ceiling and cap.
    pub backoff: (Duration, Duration),
    /// How often a connected client pulls whatever it has seen (counted in heartbeats, at
    /// least one): deliveries a router failed to push, with nothing after them to show the gap,
    /// are late by at most this. 5 minutes by default.
    pub idle_pull_every: Duration,
    /// A QUIC endpoint (from [`endpoint`]) to share between many clients, as a load
    /// generator does; `None` gives each client its own socket. Rebinding a shared endpoint
    /// moves every client on it.
    pub endpoint: Option<quinn::Endpoint>,
}

impl ClientConfig {
    /// A configuration for `router_url` trusting the CA in `ca_pem`.
    pub fn new(router_url: impl Into<String>, ca_pem: Vec<u8>) -> Self {
        Self {
            router_url: router_url.into(),
            ca_pem,
            server_overrides: HashMap::new(),
            bind_addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            heartbeat_timeout: None,
            reconnect: true,
            send_timeout: Duration::from_secs(30),
            http_timeout: http::HTTP_TIMEOUT,
            backoff: (Duration::from_millis(100), Duration::from_secs(10)),
            idle_pull_every: Duration::from_secs(300),
            endpoint: None,
        }
    }
}

/// Login choices.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoginOptions {
    /// If the user is online elsewhere, end that session instead of being refused.
    pub takeover: bool,
}

/// A message received from another user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncomingMessage {
    /// Message id assigned by cim.
    pub msg_id: u64,
    /// Inbox sequence number.
    pub seq: u64,
    /// Sender id.
    pub from_user: u64,
    /// Sender name.
    pub from_name: String,
    /// Group name, or `None` for a private message.
    pub group: Option<String>,
    /// Text.
    pub body: String,
    /// When cim accepted it, milliseconds since the Unix epoch.
    pub created_at_ms: u64,
    /// Set when this is no message but its sender's unsend of an earlier message of theirs
    /// (private, or in the same group), with that message's id: drop it if it is shown or
    /// kept (an application acts on an unsend only of a message from the same sender, in the
    /// same place). `body` is then only a note. One unsend may come twice: in the message's
    /// place, if the message was still waiting (and found), and later.
    pub unsends: Option<u64>,
}

impl From<Delivery> for IncomingMessage {
    fn from(d: Delivery) -> Self {
        IncomingMessage {
            msg_id: d.msg_id,
            seq: d.seq,
            from_user: d.from_user,
            from_name: d.from_name,
            group: (!d.group.is_empty()).then_some(d.group),
            body: d.body,
            created_at_ms: d.created_at_ms,
            unsends: (d.unsends != 0).then_some(d.unsends),
        }
    }
}

/// How a lost connection was re-established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reconnected {
    /// Server now holding the session.
    pub server_id: String,
    /// Whether a new login through the router was needed (otherwise the same session
    /// resumed on the same server).
    pub relogin: bool,
    /// Whether the QUIC handshake used 0-RTT.
    pub zero_rtt: bool,
}

/// Something that happened to the session. New kinds may come in later versions: a `match`
/// needs an arm for the others.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A message arrived (in inbox order, each once).
    Message(IncomingMessage),
    /// The session was ended by the server because the user logged in elsewhere or logged out.
    /// No reconnect follows.
    Kicked(String),
    /// The server is shutting down; the client moves to another server.
    Drain(String),
    /// The connection to the server is gone (closed, lost, or silent past the heartbeat
    /// timeout). A reconnect follows unless reconnecting is off.
    Disconnected(String),
    /// The connection is back.
    Reconnected(Reconnected),
    /// Reconnecting keeps failing: said at the 4th, 8th, 16th... failed attempt, with the
    /// latest attempt's error. The client goes on trying.
    Reconnecting {
        /// Failed attempts so far.
        attempts: u32,
        /// Why the latest one failed.
        error: String,
    },
    /// A user who shares a group with us came online (`online`) or went offline. Told once per
    /// change: a takeover, after which the user is still online, is not told.
    Presence {
        /// The user.
        user_id: u64,
        /// Its name.
        name: String,
        /// Whether it is online now.
        online: bool,
    },
    /// Someone joined or left a group we are in, or its owner removed them (said in groups
    /// of at most 100 members; always to the user removed, which may be us).
    GroupChange {
        /// The group.
        group: String,
        /// The user who joined or left.
        user_id: u64,
        /// Its name.
        name: String,
        /// Whether it joined (otherwise it left).
        joined: bool,
        /// The owner (id and name) who removed the user; `None` when the user joined or
        /// left.
        by: Option<(u64, String)>,
    },
    /// We own a group now: its owner (`previous_owner_id`) left, and we are the member with
    /// the lowest id, or (`handed_over`) it handed the group to us and stays a member. Best
    /// effort: told only if we are online then.
    GroupOwner {
        /// The group.
        group: String,
        /// The owner before us.
        previous_owner_id: u64,
        /// Its name.
        previous_owner_name: String,
        /// Whether it handed the group to us ([`Client::transfer_group`]) rather than left.
        handed_over: bool,
    },
    /// A group's owner invited us: [`Client::join_group`] lets us in (an invite-only group
    /// lets in no one else). Best effort: told only if we are online then.
    GroupInvite {
        /// The group.
        group: String,
        /// The owner who invited us.
        by_user_id: u64,
        /// Its name.
        by_name: String,
    },
    /// Another member owns a group we are in now: its owner handed it over (`handed_over`),
    /// or left and it passed to the member with the lowest id. Said in groups of at most 100
    /// members. Best effort: told only if we are online then.
    GroupOwnerChange {
        /// The group.
        group: String,
        /// The owner now.
        owner_id: u64,
        /// Its name.
        owner_name: String,
        /// The owner before.
        previous_owner_id: u64,
        /// Its name.
        previous_owner_name: String,
        /// Whether the owner before handed the group over (rather than left).
        handed_over: bool,
    },
    /// A user read our private messages to them up to `up_to_msg_id` (as far as it says,
    /// those before it too). Best effort: told only if we are online then;
    /// [`Client::read_receipts`] lists the latest of each reader.
    Read(ReadReceipt),
}

/// [`Client::groups_and_invitations`]'s answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MyGroups {
    /// The groups we belong to, by name.
    pub groups: Vec<String>,
    /// The groups whose invitations wait for us, by name.
    pub invitations: Vec<String>,
}

/// A group member as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMemberInfo {
    /// Account id.
    pub id: u64,
    /// Account name.
    pub name: String,
    /// Whether the member is online.
    pub online: bool,
    /// Whether the member owns the group (invites and removes members, hands it over).
    pub owner: bool,
}

/// The stream of [`Event`]s of one session.
///
/// A message counts as done (acknowledged, and trimmed from the inbox) once the application
/// asks for the next event after it, or closes or logs out the client. Messages it took and
/// did not finish with, if it crashes or drops the client without closing it, stay in the
/// inbox for the user's next client.
pub struct Events {
    rx: mpsc::Receiver<Event>,
    progress: Arc<Progress>,
    /// Cancelled once the session is over for good (kicked, closed, or lost with reconnects
    /// off) and its last status event is in the queue: then no more events come, even while
    /// the application still holds the client.
    ended: CancellationToken,
}

impl Events {
    /// The next event, or `None` once the session is over (kicked, closed, or lost with
    /// reconnecting off) and every event was taken.
    pub async fn next(&mut self) -> Option<Event> {
        self.progress.done_with_taken();
        let event = tokio::select! {
            biased;
            event = self.rx.recv() => event,
            () = self.ended.cancelled() => self.rx.try_recv().ok(),
        };
        if let Some(Event::Message(message)) = &event {
            self.progress
                .taken
                .fetch_max(message.seq, Ordering::Relaxed);
        }
        event
    }

    /// Events waiting to be taken: an application can tell it is falling behind. Past
    /// [`Events::CAPACITY`], deliveries wait on the server side.
    pub fn waiting(&self) -> usize {
        self.rx.len()
    }

    /// Most events held for the application at once.
    pub const CAPACITY: usize = 1024;
}

/// How far the application got with its messages; shared by [`Events`] and the client (not
/// the whole client state, which holds the event sender: `Events` would never end).
#[derive(Debug, Default)]
struct Progress {
    /// Seq of the last message the application took.
    taken: AtomicU64,
    /// Seq up to which the application is done with every message.
    processed: AtomicU64,
}

impl Progress {
    /// The application is done with every message it took.
    fn done_with_taken(&self) {
        let taken = self.taken.load(Ordering::Relaxed);
        self.processed.fetch_max(taken, Ordering::Relaxed);
    }

    /// What to acknowledge of `have` (the seq up to which the client holds every entry):
    /// never past what the application is done with.
    fn ack_up_to(&self, have: u64) -> u64 {
        have.min(self.processed.load(Ordering::Relaxed))
    }
}

/// Receives messages, like CIM's message callback.
pub trait MessageHandler: Send {
    /// Called for each incoming message. Once it returns, the message counts as done
    /// (acknowledged): store it before returning if it must survive a crash. Closing or
    /// logging out the client counts it as done too, also while this still runs (as for
    /// [`Events`]): close only after the handler has returned.
    fn on_message(&mut self, message: &IncomingMessage);
    /// Called for every other event; the default ignores them.
    fn on_event(&mut self, _event: &Event) {}
}

/// Feeds every event to `handler` until the session ends.
pub async fn run_handler(mut events: Events, handler: &mut dyn MessageHandler) {
    while let Some(event) = events.next().await {
        match &event {
            Event::Message(m) => handler.on_message(m),
            other => handler.on_event(other),
        }
    }
}

/// The outcome of an accepted send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// Message id assigned by cim (the same for every retry of one send).
    pub msg_id: u64,
    /// Recipient inboxes the message is durably stored in.
    pub recipients: u32,
    /// For a private message: whether the recipient was online when it was stored (pushed
    /// at once) or is not (it waits in the inbox for their next login). `None` for group
    /// messages and from older routers.
    pub recipient_online: Option<bool>,
}

/// Who a session belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    /// Account id.
    pub user_id: u64,
    /// Account name.
    pub name: String,
    /// Assigned server.
    pub server_id: String,
    /// Server address the router returned.
    pub server_addr: SocketAddr,
}

/// Counters of what the client did to keep its session.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Connections re-established.
    pub reconnects: u64,
    /// Of those, how many needed a new login through the router.
    pub relogins: u64,
    /// Of the re-logins, how many the session token did (no password).
    pub token_relogins: u64,
    /// Fresh session tokens the server handed over while connected.
    pub token_renewals: u64,
    /// Of those, how many used 0-RTT.
    pub zero_rtt: u64,
    /// Deliveries dropped as duplicates.
    pub duplicates: u64,
    /// Pulls made to fill gaps or catch up.
    pub pulls: u64,
    /// Sequence numbers the inbox no longer had (trimmed by its caps).
    pub skipped: u64,
    /// Send attempts repeated after a transport failure, a timeout or a `retry` answer.
    pub send_retries: u64,
    /// Acked sends that went out on a stream together with others (sends queued while
    /// earlier ones waited for their acks).
    pub sends_shared: u64,
}

/// A QUIC endpoint bound to `config.bind_addr` that trusts `config.ca_pem` and keeps TLS
/// sessions for 0-RTT resumption.
pub fn endpoint(config: &ClientConfig) -> Result<quinn::Endpoint, ClientError> {
    let roots =
        tls::roots_from_pem(&config.ca_pem).map_err(|e| ClientError::Config(e.to_string()))?;
    let mut tls = tls::client_config(roots, &[ALPN_CLIENT], None)
        .map_err(|e| ClientError::Config(e.to_string()))?;
    tls.enable_early_data = true;
    let quic = transport::client_config(tls, Link::Client)
        .map_err(|e| ClientError::Config(e.to_string()))?;
    transport::client_endpoint(config.bind_addr, quic)
        .map_err(|e| ClientError::Connection(e.to_string()))
}

/// Creates an account through the router. Returns the new user id.
pub async fn register(
    config: &ClientConfig,
    name: &str,
    password: &str,
) -> Result<u64, ClientError> {
    RouterApi::new(config)?.register(name, password).await
}

/// A logged-in session. Cheap to share behind an `Arc`; dropping it closes the session.
pub struct Client {
    shared: Arc<Shared>,
}

struct Current {
    info: SessionInfo,
    token: String,
}

struct Shared {
    config: ClientConfig,
    api: RouterApi,
    name: String,
    /// For a login when the token will not do; replaced by [`Client::change_password`].
    password: std::sync::Mutex<String>,
    endpoint: quinn::Endpoint,
    current: std::sync::Mutex<Current>,
    /// The live connection's send queue (and through it the connection).
    conn: watch::Sender<Option<Arc<SendQueue>>>,
    events: mpsc::Sender<Event>,
    inbox: AsyncMutex<Reorder<IncomingMessage>>,
    /// `inbox.last()` once its messages are on the event channel, readable without the inbox
    /// lock: the lock is held while events are emitted, and an application that asked for
    /// [`Client::last_seq`] from its event loop would otherwise wait on itself.
    delivered_seq: AtomicU64,
    progress: Arc<Progress>,
    /// Status events emitted and not yet in the application's queue. Messages wait for them
    /// (see [`Shared::accept_deliveries`]), so a `Reconnected` still comes before the messages
    /// of the connection it announces.
    status_backlog: Arc<Pending>,
    /// Asks the connection task to send a ping now, carrying the latest processed mark.
    ack_flush: Notify,
    /// Woken when the pong of such a ping arrives: the server has recorded the ack.
    ack_flushed: Notify,
    gap: Notify,
    next_client_msg_id: AtomicU64,
    /// The largest body the server of the latest connection takes (0: it did not say).
    max_body_bytes: AtomicU32,
    stats: std::sync::Mutex<Stats>,
    /// What the application was last told of each user's presence.
    known_presence: std::sync::Mutex<presence::KnownPresence>,
    /// User ids found by name ([`Client::user_id_of`]): an account's name and id never change
    /// while it lives (a deleted account's name may come to a new one).
    user_ids: std::sync::Mutex<HashMap<String, u64>>,
    stop: CancellationToken,
    /// Cancelled once the supervisor task has ended: no reconnect (and no re-login) is under
    /// way any more.
    supervised: CancellationToken,
}

impl Shared {
    fn current(&self) -> std::sync::MutexGuard<'_, Current> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn password(&self) -> String {
        self.password
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_password(&self, password: &str) {
        *self.password.lock().unwrap_or_else(|p| p.into_inner()) = password.to_string();
    }

    fn user_ids(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.user_ids.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn stats(&self) -> std::sync::MutexGuard<'_, Stats> {
        self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn target(&self, server_addr: SocketAddr) -> SocketAddr {
        self.config
            .server_overrides
            .get(&server_addr)
            .copied()
            .unwrap_or(server_addr)
    }

    /// The live connection, waiting up to `deadline` for one.
    async fn live_conn(
        &self,
        deadline: tokio::time::Instant,
    ) -> Result<quinn::Connection, ClientError> {
        Ok(self.live_sends(deadline).await?.conn().clone())
    }

    /// The live connection's send queue, waiting up to `deadline` for one (`NotConnected` if
    /// none came).
    async fn live_sends(
        &self,
        deadline: tokio::time::Instant,
    ) -> Result<Arc<SendQueue>, ClientError> {
        let mut rx = self.conn.subscribe();
        let wait = rx.wait_for(|c| {
            c.as_ref()
                .is_some_and(|c| c.conn().close_reason().is_none())
        });
        tokio::select! {
            _ = self.stop.cancelled() => Err(ClientError::Closed),
            got = tokio::time::timeout_at(deadline, wait) => match got {
                Ok(Ok(conn)) => conn.clone().ok_or(ClientError::Closed),
                Ok(Err(_)) => Err(ClientError::Closed),
                Err(_) => Err(ClientError::NotConnected),
            },
        }
    }

    /// Counts every message the application took as done and acknowledges them with a ping,
    /// waiting (briefly) for its pong so that the ack is in before the connection closes.
    /// While the client reconnects, waits a little for the connection: skipped, the ack was
    /// lost, and the user's next client got again everything finished since the last one.
    async fn flush_acks(&self) {
        self.progress.done_with_taken();
        let deadline = tokio::time::Instant::now() + FINAL_ACK_RECONNECT_WAIT;
        if let Err(e) = self.live_conn(deadline).await {
            tracing::debug!(error = %e, "no connection for the final ack; the last messages may come again");
            return;
        }
        let flushed = self.ack_flushed.notified();
        tokio::pin!(flushed);
        flushed.as_mut().enable();
        self.ack_flush.notify_one();
        if tokio::time::timeout(ACK_FLUSH_WAIT, flushed).await.is_err() {
            tracing::debug!("no pong for the final ack; the last messages may come again");
        }
    }

    /// Offers deliveries to the reorder buffer and emits what became releasable, in order.
    /// Returns the sequence number up to which the application has everything (what the
    /// client acks): once the application has dropped its [`Events`], that stays where the
    /// last message it got left it, so what it never got stays in the inbox for the user's
    /// next client.
    async fn accept_deliveries(
        &self,
        deliveries: Vec<Delivery>,
        first_of_page: Option<u64>,
    ) -> u64 {
        let mut inbox = self.inbox.lock().await;
        let mut ready = Vec::new();
        if let Some(first) = first_of_page {
            ready.extend(inbox.skip_to(first));
        }
        for delivery in deliveries {
            let seq = delivery.seq;
            ready.extend(inbox.offer(seq, IncomingMessage::from(delivery)));
        }
        {
            let mut stats = self.stats();
            stats.duplicates = inbox.duplicates();
            stats.skipped = inbox.skipped();
        }
        // Emitting under the lock keeps events in sequence order across concurrent streams,
        // and after the status events emitted before (a `Reconnected` before the messages
        // of the connection it announces).
        let mut refused = self.events.is_closed();
        if !ready.is_empty() && !refused {
            self.status_backlog.none().await;
        }
        let mut handed_over = None;
        for message in ready {
            let seq = message.seq;
            if self.events.send(Event::Message(message)).await.is_err() {
                refused = true;
                break;
            }
            handed_over = Some(seq);
        }
        if refused {
            let have = handed_over.unwrap_or_else(|| self.delivered_seq.load(Ordering::Relaxed));
            self.delivered_seq.store(have, Ordering::Relaxed);
            return have;
        }
        if inbox.has_gap() {
            self.gap.notify_one();
        }
        self.delivered_seq.store(inbox.last(), Ordering::Relaxed);
        inbox.last()
    }
}

impl Client {
    /// Logs in through the router, connects to the assigned server and logs in on its control
    /// stream. Returns the client and its event stream.
    pub async fn login(
        config: &ClientConfig,
        name: &str,
        password: &str,
        options: LoginOptions,
    ) -> Result<(Client, Events), ClientError> {
        let api = RouterApi::new(config)?;
        let grant = api.login(name, password, options.takeover).await?;
        let endpoint = match &config.endpoint {
            Some(shared) => shared.clone(),
            None => endpoint(config)?,
        };

        let (events_tx, events_rx) = mpsc::channel(Events::CAPACITY);
        let progress = Arc::new(Progress::default());
        let shared = Arc::new(Shared {
            config: config.clone(),
            api,
            name: name.to_string(),
            password: std::sync::Mutex::new(password.to_string()),
            endpoint,
            current: std::sync::Mutex::new(Current {
                info: grant.session_info(),
                token: grant.token.clone(),
            }),
            conn: watch::channel(None).0,
            events: events_tx,
            inbox: AsyncMutex::new(Reorder::new(0)),
            delivered_seq: AtomicU64::new(0),
            progress: progress.clone(),
            status_backlog: Arc::new(Pending::default()),
            ack_flush: Notify::new(),
            ack_flushed: Notify::new(),
            gap: Notify::new(),
            // Random 48 bits: a restarted client of the same user, within the router's dedup
            // window, must not reuse an id of its previous run (its message would be taken
            // for that one and not stored). Far from overflowing at any sending rate.
            next_client_msg_id: AtomicU64::new((rand::random::<u64>() >> 16) + 1),
            max_body_bytes: AtomicU32::new(0),
            stats: std::sync::Mutex::new(Stats::default()),
            known_presence: Default::default(),
            user_ids: Default::default(),
            stop: CancellationToken::new(),
            supervised: CancellationToken::new(),
        });
        let target = shared.target(grant.server_addr);
        let name_for_tls = transport::server_name(&grant.server_addr);
        // A handshake on a very lossy path can outlast one attempt: try a few times with the
        // same token before giving up (a refusal ends it at once).
        let mut attempt = 0;
        let connected = loop {
            attempt += 1;
            match connect(
                &shared.endpoint,
                target,
                &name_for_tls,
                &grant.token,
                0,
                false,
                CONNECT_TIMEOUT,
            )
            .await
            {
                Ok((mut connected, _)) => {
                    // An earlier attempt with the same session may have logged in on the
                    // server before timing out here; its end, reported late, could release the
                    // route this one was confirmed with. Pull, as a reconnect does.
                    if attempt > 1 {
                        connected.inbox_caught_up_to = None;
                    }
                    shared
                        .max_body_bytes
                        .store(connected.max_body_bytes, Ordering::Relaxed);
                    break connected;
                }
                Err(e @ ClientError::LoginRefused { .. }) => {
                    // Given back, as below: else a retry is refused as already online until
                    // the router's claim for this login lapses.
                    let _ = shared.api.logout(&grant.token).await;
                    return Err(e);
                }
                Err(e) if attempt >= LOGIN_CONNECT_ATTEMPTS => {
                    // The router holds the user for this login until its claim lapses: give
                    // it back, so that trying again is not refused as already online.
                    let _ = shared.api.logout(&grant.token).await;
                    return Err(ClientError::Connection(format!(
                        "could not reach server {} at {}: {e}",
                        grant.server_id, grant.server_addr
                    )));
                }
                Err(e) => tracing::debug!(error = %e, attempt, "connect failed; retrying"),
            }
        };
        let events_ended = CancellationToken::new();
        let status = StatusEvents::start(
            shared.events.clone(),
            shared.status_backlog.clone(),
            events_ended.clone(),
        );
        tokio::spawn(supervise(shared.clone(), connected, status));
        tokio::spawn(fill_gaps(shared.clone()));
        Ok((
            Client { shared },
            Events {
                rx: events_rx,
                progress,
                ended: events_ended,
            },
        ))
    }

    /// Who this session belongs to (the server changes after a re-login).
    pub fn info(&self) -> SessionInfo {
        self.shared.current().info.clone()
    }

    /// The largest message body, in bytes, the server takes (`None` from a server that does
    /// not say): an application can refuse a longer one before sending it.
    pub fn max_body_bytes(&self) -> Option<usize> {
        match self.shared.max_body_bytes.load(Ordering::Relaxed) {
            0 => None,
            max => Some(max as usize),
        }
    }

    /// The session token (for the router's HTTP API).
    pub fn token(&self) -> String {
        self.shared.current().token.clone()
    }

    /// What the client did to keep its session so far.
    pub fn stats(&self) -> Stats {
        self.shared.stats().clone()
    }

    /// QUIC statistics of the current connection (datagrams, frames by type, path RTT), if
    /// one is up. They start over on every reconnect.
    pub fn transport_stats(&self) -> Option<quinn::ConnectionStats> {
        self.shared.conn.borrow().as_ref().map(|c| c.conn().stats())
    }

    /// Highest inbox sequence number up to which every message was delivered.
    pub async fn last_seq(&self) -> u64 {
        self.shared.delivered_seq.load(Ordering::Relaxed)
    }

    /// Moves the QUIC socket to a new local address (as when a phone changes networks). The
    /// connection migrates; the session continues without a new login.
    pub fn rebind(&self, addr: SocketAddr) -> Result<SocketAddr, ClientError> {
        let socket =
            transport::udp_socket(addr).map_err(|e| ClientError::Connection(e.to_string()))?;
        self.shared
            .endpoint
            .rebind(socket)
            .map_err(|e| ClientError::Connection(e.to_string()))?;
        self.local_addr()
    }

    /// The local address of the client's UDP socket (after a [`Client::rebind`], the new one).
    pub fn local_addr(&self) -> Result<SocketAddr, ClientError> {
        self.shared
            .endpoint
            .local_addr()
            .map_err(|e| ClientError::Connection(e.to_string()))
    }

    /// Sends a private message to `to_user`.
    pub async fn send_private(&self, to_user: u64, body: &str) -> Result<Ack, ClientError> {
        self.send(Target::ToUser(to_user), body).await
    }

    /// Sends a message to a group; `"all"` reaches everyone online.
    pub async fn send_group(&self, group: &str, body: &str) -> Result<Ack, ClientError> {
        self.send(Target::Group(group.to_string()), body).await
    }

    /// Sends with an explicit client message id (normally chosen by the client). Sending the
    /// same id again is safe: cim stores and delivers the message once. Id 0 opts out of that:
    /// each send of it is a new message, so one whose outcome is unknown (no ack in time, the
    /// connection lost, a `retry` answer) is not sent again but fails.
    pub async fn send_with_id(
        &self,
        client_msg_id: u64,
        target: Target,
        body: &str,
    ) -> Result<Ack, ClientError> {
        let request = ClientRequest {
            kind: Some(client_request::Kind::Send(ChatMessage {
                client_msg_id,
                target: Some(target),
                body: body.to_string(),
            })),
        };
        let frame = match cim_proto::encode_frame(&request, cim_proto::DEFAULT_MAX_FRAME) {
            Ok(frame) => frame,
            // Too large for any server to read: refused here, as a server would.
            Err(FrameError::TooLarge { .. }) => {
                let message = match self.max_body_bytes() {
                    Some(max) => cim_proto::too_long(body.len(), max),
                    None => format!(
                        "message too long: {} bytes, more than a frame holds",
                        body.len()
                    ),
                };
                return Err(ClientError::SendRefused {
                    code: cim_proto::TOO_LARGE.into(),
                    message,
                });
            }
            Err(e) => return Err(e.into()),
        };
        let deadline = tokio::time::Instant::now() + self.shared.config.send_timeout;
        let mut unconfirmed = 0u32;
        let mut attempted = false;
        loop {
            let sends = match self.shared.live_sends(deadline).await {
                // An earlier attempt may have been stored: the outcome is unknown.
                Err(ClientError::NotConnected | ClientError::Closed) if attempted => {
                    return Err(ClientError::Timeout);
                }
                other => other?,
            };
            // Every earlier attempt ended without an answer that settled it (each one that
            // did returned): any of them may have been stored.
            let earlier_unsettled = attempted;
            attempted = true;
            let attempt_deadline = deadline.min(tokio::time::Instant::now() + SEND_ATTEMPT_TIMEOUT);
            let attempt =
                tokio::time::timeout_at(attempt_deadline, sends.send(client_msg_id, frame.clone()))
                    .await;
            match attempt {
                Ok(Ok((ack, carried))) if ack.code.is_empty() => {
                    if carried == Carried::Shared {
                        self.shared.stats().sends_shared += 1;
                    }
                    return Ok(Ack {
                        msg_id: ack.msg_id,
                        recipients: ack.recipients,
                        recipient_online: ack.recipient_online,
                    });
                }
                // Possibly stored, possibly not: the same id again is stored at most once (id 0
                // opts out of that, so it is not resent). The server answers at once while it
                // has no router, so these resends back off.
                Ok(Ok((ack, _)))
                    if ack.code == cim_proto::SEND_RETRY
                        && self.shared.config.reconnect
                        && client_msg_id != 0 =>
                {
                    tracing::debug!(client_msg_id, message = %ack.message, "send unconfirmed");
                    unconfirmed += 1;
                }
                // A refusal of a resend says nothing about an earlier attempt that may have
                // been stored, unless the message itself is refused (no attempt of it could
                // be stored): "not sent" would be wrong (an application sending it again under
                // a new id would deliver it twice). A passing refusal is waited out; any other
                // leaves the outcome unknown.
                Ok(Ok((ack, _)))
                    if earlier_unsettled
                        && (ack.code == cim_proto::RATE_LIMITED
                            || ack.code == cim_proto::SEND_UNAVAILABLE) =>
                {
                    tracing::debug!(client_msg_id, code = %ack.code, "resend refused for now");
                    unconfirmed += 1;
                }
                Ok(Ok((ack, _)))
                    if earlier_unsettled
                        && !REFUSALS_OF_THE_MESSAGE.contains(&ack.code.as_str()) =>
                {
                    tracing::debug!(client_msg_id, code = %ack.code, "resend refused; outcome unknown");
                    return Err(ClientError::Timeout);
                }
                Ok(Ok((ack, _))) => {
                    return Err(ClientError::SendRefused {
                        code: ack.code,
                        message: ack.message,
                    });
                }
                Ok(Err(e)) => tracing::debug!(client_msg_id, error = %e, "send attempt failed"),
                Err(_) => tracing::debug!(client_msg_id, "send attempt timed out"),
            }
            // An id-0 send may have been stored although unconfirmed: sent again, it would be
            // stored twice.
            if !self.shared.config.reconnect
                || client_msg_id == 0
                || tokio::time::Instant::now() >= deadline
            {
                return Err(ClientError::Timeout);
            }
            self.shared.stats().send_retries += 1;
            // Give a dying connection time to be noticed before trying again; after `retry`
            // answers, 50 ms doubling up to about a second.
            let pause = Duration::from_millis(50) * 2u32.pow(unconfirmed.min(5));
            tokio::time::sleep(pause.min(Duration::from_secs(1))).await;
        }
    }

    async fn send(&self, target: Target, body: &str) -> Result<Ack, ClientError> {
        let id = self
            .shared
            .next_client_msg_id
            .fetch_add(1, Ordering::Relaxed);
        self.send_with_id(id, target, body).await
    }

    async fn group_request(
        &self,
        op: group_request::Op,
        name: &str,
    ) -> Result<GroupResult, ClientError> {
        self.group_request_with(GroupRequest {
            op: op as i32,
            name: name.to_string(),
            ..Default::default()
        })
        .await
    }

    async fn group_request_with(&self, request: GroupRequest) -> Result<GroupResult, ClientError> {
        let request = ClientRequest {
            kind: Some(client_request::Kind::Group(request)),
        };
        let deadline = tokio::time::Instant::now() + SEND_ATTEMPT_TIMEOUT;
        let conn = self.shared.live_conn(deadline).await?;
        let reply: GroupResult = tokio::time::timeout(SEND_ATTEMPT_TIMEOUT, async {
            let (mut send, mut recv) = conn.open_bi().await?;
            write_frame(&mut send, &request, 4096).await?;
            send.finish()?;
            Ok::<_, ClientError>(read_only_frame(&mut recv, MAX_PULL_FRAME).await?)
        })
        .await
        .map_err(|_| ClientError::Timeout)??;
        if reply.code.is_empty() {
            Ok(reply)
        } else {
            Err(ClientError::Refused {
                code: reply.code,
                message: reply.message,
            })
        }
    }

    /// Creates a named group; we become its owner and first member.
    pub async fn create_group(&self, name: &str) -> Result<(), ClientError> {
        self.group_request(group_request::Op::Create, name)
            .await
            .map(|_| ())
    }

    /// Creates a named group that only users we invite get into; we become its owner and
    /// first member.
    pub async fn create_invite_only_group(&self, name: &str) -> Result<(), ClientError> {
        let reply = self
            .group_request_with(GroupRequest {
                op: group_request::Op::Create as i32,
                name: name.to_string(),
                invite_only: true,
                ..Default::default()
            })
            .await?;
        // An older router or server creates it open, and says nothing of it.
        if !reply.invite_only {
            return Err(ClientError::Protocol(format!(
                "the group {name} was created open: the cluster is too old for invite-only groups"
            )));
        }
        Ok(())
    }

    /// Invites `user` to a group we own (refused `not_owner` otherwise): their join then lets
    /// them in. They are told if online.
    pub async fn invite(&self, group: &str, user: u64) -> Result<(), ClientError> {
        self.member_change(group_request::Op::Invite, group, user)
            .await
    }

    /// Removes `user` from a group we own (refused `not_owner` otherwise), or withdraws their
    /// invitation; a removed member and the group's online members are told. In an open
    /// group they may join again.
    pub async fn remove_member(&self, group: &str, user: u64) -> Result<(), ClientError> {
        self.member_change(group_request::Op::Remove, group, user)
            .await
    }

    /// Hands a group we own (refused `not_owner` otherwise) to `user`, one of its members
    /// (`no_such_member` otherwise, `unknown_user` for an account that is gone); we stay a
    /// member, and the group's waiting invitations are void, as when an owner leaves. They
    /// are told if online.
    pub async fn transfer_group(&self, group: &str, user: u64) -> Result<(), ClientError> {
        self.member_change(group_request::Op::Transfer, group, user)
            .await
    }

    async fn member_change(
        &self,
        op: group_request::Op,
        group: &str,
        user: u64,
    ) -> Result<(), ClientError> {
        let reply = self
            .group_request_with(GroupRequest {
                op: op as i32,
                name: group.to_string(),
                user_id: user,
                ..Default::default()
            })
            .await?;
        // An older router answers an op it does not know as a listing of our groups.
        if !reply.done {
            return Err(ClientError::Protocol(
                "the router is too old for this group change".into(),
            ));
        }
        Ok(())
    }

    /// Joins a group.
    pub async fn join_group(&self, name: &str) -> Result<(), ClientError> {
        self.group_request(group_request::Op::Join, name)
            .await
            .map(|_| ())
    }

    /// Leaves a group.
    pub async fn leave_group(&self, name: &str) -> Result<(), ClientError> {
        self.group_request(group_request::Op::Leave, name)
            .await
            .map(|_| ())
    }

    /// Members of a group with their presence.
    pub async fn group_members(&self, name: &str) -> Result<Vec<GroupMemberInfo>, ClientError> {
        let reply = self.group_request(group_request::Op::Members, name).await?;
        Ok(reply
            .members
            .into_iter()
            .map(|m| GroupMemberInfo {
                id: m.user_id,
                name: m.name,
                online: m.online,
                owner: m.owner,
            })
            .collect())
    }

    /// The groups we belong to.
    pub async fn my_groups(&self) -> Result<Vec<String>, ClientError> {
        Ok(self.groups_and_invitations().await?.groups)
    }

    /// The groups we belong to, and those whose invitations wait for us (a join lets us in;
    /// at most 1,000, by name; an older router or server lists none).
    pub async fn groups_and_invitations(&self) -> Result<MyGroups, ClientError> {
        let reply = self.group_request(group_request::Op::Mine, "").await?;
        Ok(MyGroups {
            groups: reply.groups,
            invitations: reply.invitations,
        })
    }

    /// Users online now whose name starts with `prefix` (empty: everyone), by name: the
    /// first page, at most 1,000 ([`Client::online_page`] for the next ones).
    pub async fn online_users(&self, prefix: &str) -> Result<Vec<OnlineUser>, ClientError> {
        let token = self.token();
        self.shared.api.online_users(&token, prefix).await
    }

    /// A page of the users online now whose name starts with `prefix` and comes after `after`
    /// (the last name of the page before; empty for the first), at most `limit` (1 to 1,000;
    /// `None` for 1,000).
    pub async fn online_page(
        &self,
        prefix: &str,
        after: &str,
        limit: Option<usize>,
    ) -> Result<OnlinePage, ClientError> {
        let token = self.token();
        self.shared
            .api
            .online_page(&token, prefix, after, limit)
            .await
    }

    /// The user named `name` (in any case) with whether they are online, or
    /// `None` if there is no such user: how to find the id of someone offline.
    pub async fn find_user(&self, name: &str) -> Result<Option<NamedUser>, ClientError> {
        let token = self.token();
        self.shared.api.user_named(&token, name).await
    }

    /// Changes our password from `old` to `new` (4-256 bytes). Refused `wrong_password` (which
    /// counts as a failed login) when `old` is not the password. This login stays, and a
    /// re-login the client makes by itself uses the new password from now on. When no
    /// answer comes (the change may have been made), it is asked again, up to
    /// [`PASSWORD_CHANGE_ATTEMPTS`] times each a try. Should all go unanswered, or a later try
    /// be refused `wrong_password` (the change may have been made on another router), the
    /// error is [`ClientError::Http`]: the outcome is unknown, and a login with the new
    /// password tells.
    pub async fn change_password(&self, old: &str, new: &str) -> Result<(), ClientError> {
        let mut attempt = 1;
        // The token read anew each time: a re-login meanwhile replaced it.
        while let Err(e) = self
            .shared
            .api
            .change_password(&self.token(), old, new)
            .await
        {
            // A try went unanswered and may have made the change, which the router that
            // refused this one does not know of (another router, or one restarted since).
            if attempt > 1 && e.code() == Some("wrong_password") {
                return Err(ClientError::Http(format!(
                    "an earlier try went unanswered and this one was refused ({e})"
                )));
            }
            if !matches!(e, ClientError::Http(_)) || attempt == PASSWORD_CHANGE_ATTEMPTS {
                return Err(e);
            }
            tracing::debug!(error = %e, attempt, "password change unanswered; asking again");
            tokio::time::sleep(Duration::from_millis(200) * attempt).await;
            attempt += 1;
        }
        self.shared.set_password(new);
        Ok(())
    }

    /// Deletes our account, given its password (refused `wrong_password` otherwise, which
    /// counts as a failed login, as for [`Client::change_password`]). The session ends (the
    /// application gets [`Event::Kicked`] with `account deleted`, or the events simply end)
    /// and no reconnect follows; our groups are left (each passed on as on a leave), our
    /// inbox, blocks and last seen deleted, and the name is free again. Messages we sent stay
    /// with their recipients.
    pub async fn delete_account(&self, password: &str) -> Result<(), ClientError> {
        let token = self.token();
        self.shared.api.delete_account(&token, password).await?;
        // The router kicks the session; should the kick be lost, no re-login is tried.
        self.shared.stop.cancel();
        Ok(())
    }

    /// The id of the user named `name`, or `None` if there is no such user; asked of the router
    /// once per name (up to [`MAX_USER_IDS_KEPT`] names), since a name keeps its id for as
    /// long as its account lives. A deleted account's id is refused `unknown_user` wherever
    /// it is used, and its name may come to another user: [`Client::forget_user_id`] then
    /// makes the next call ask again.
    pub async fn user_id_of(&self, name: &str) -> Result<Option<u64>, ClientError> {
        let known = self.shared.user_ids().get(name).copied();
        if known.is_some() {
            return Ok(known);
        }
        let Some(user) = self.find_user(name).await? else {
            return Ok(None);
        };
        let mut ids = self.shared.user_ids();
        if ids.len() >= MAX_USER_IDS_KEPT {
            ids.clear();
        }
        // Kept as asked for: the same name in another case is asked for once more.
        ids.insert(name.to_string(), user.id);
        Ok(Some(user.id))
    }

    /// Forgets the id [`Client::user_id_of`] keeps for `name`.
    pub fn forget_user_id(&self, name: &str) {
        self.shared.user_ids().remove(name);
    }

    /// Blocks `user`: their private messages to us are refused from now on (they are told
    /// `blocked`; nothing is stored), and so are their invitations to groups. Messages stored
    /// before stay, and shared groups are shared as before.
    pub async fn block(&self, user: u64) -> Result<BlockReply, ClientError> {
        let token = self.token();
        self.shared.api.block(&token, user).await
    }

    /// Unblocks `user`; returns whether they were blocked.
    pub async fn unblock(&self, user: u64) -> Result<bool, ClientError> {
        let token = self.token();
        self.shared.api.unblock(&token, user).await
    }

    /// Our settings (whether we hide when we were last seen, and read receipts).
    pub async fn settings(&self) -> Result<Settings, ClientError> {
        let token = self.token();
        self.shared.api.settings(&token).await
    }

    /// Hides (or shows again) when we were last seen: others' [`Client::find_user`] shows us
    /// offline without a time, and, as the price, ours shows no one's time either.
    pub async fn hide_last_seen(&self, hidden: bool) -> Result<Settings, ClientError> {
        let token = self.token();
        self.shared.api.hide_last_seen(&token, hidden).await
    }

    /// Sets our status, a line about ourselves (at most 140 characters, no line breaks) that
    /// others see when they look us up ([`Client::find_user`]; not those we block), or clears
    /// it with an empty one. Returns the status kept (trimmed).
    pub async fn set_status(&self, status: &str) -> Result<Option<String>, ClientError> {
        let token = self.token();
        self.shared.api.set_status(&token, status).await
    }

    /// Stops giving read receipts (or gives them again): [`Client::mark_read`] then tells no
    /// one, and, as the price, no one's receipts reach us ([`Event::Read`],
    /// [`Client::read_receipts`]).
    pub async fn hide_read_receipts(&self, hidden: bool) -> Result<Settings, ClientError> {
        let token = self.token();
        self.shared.api.hide_read_receipts(&token, hidden).await
    }

    /// Unsends (takes back) our private message `msg_id` to `user`, sent at most 24 hours ago
    /// (`too_late` after): it is taken out of their inbox if the router finds it still
    /// waiting there, so they never get it, and their client gets an [`IncomingMessage`] whose [`IncomingMessage::unsends`]
    /// names it, to drop it if it has it. Refused as a message to them would be (`blocked`,
    /// `unknown_user`); at most 60 a minute. Asking again is harmless (a client acts on the
    /// first).
    pub async fn unsend(&self, user: u64, msg_id: u64) -> Result<(), ClientError> {
        self.unsend_to(&Target::ToUser(user), msg_id).await
    }

    /// [`Client::unsend`] for our message `msg_id` to `group`, told to its members now (we
    /// must be one: `not_member`); a message to everyone online cannot be unsent.
    pub async fn unsend_in_group(&self, group: &str, msg_id: u64) -> Result<(), ClientError> {
        self.unsend_to(&Target::Group(group.to_string()), msg_id)
            .await
    }

    /// [`Client::unsend`] or [`Client::unsend_in_group`], by where the message went.
    pub async fn unsend_to(&self, to: &Target, msg_id: u64) -> Result<(), ClientError> {
        self.shared.api.unsend(&self.token(), to, msg_id).await
    }

    /// Tells `user` that we read its private messages up to `msg_id` (an
    /// [`IncomingMessage::msg_id`] of theirs): they get an [`Event::Read`] if online, and
    /// their [`Client::read_receipts`] lists it. Nothing is told, and no error says so, when
    /// either of us hides read receipts or they block us. At most 600 a minute: give one for
    /// the latest message of a conversation, not one for each (`unknown_user` for an account
    /// that is gone).
    pub async fn mark_read(&self, user: u64, msg_id: u64) -> Result<(), ClientError> {
        let token = self.token();
        self.shared.api.mark_read(&token, user, msg_id).await
    }

    /// Who read our private messages, how far (the latest receipt of each reader, the latest
    /// first, for at most 1,000 readers; in a cluster the list expires a month after its
    /// latest receipt). Empty while we hide read receipts.
    pub async fn read_receipts(&self) -> Result<Vec<ReadReceipt>, ClientError> {
        let token = self.token();
        self.shared.api.read_receipts(&token).await
    }

    /// Reports `user` to the cluster's operators (spam, abuse), with `reason` in our words (at
    /// most 500 bytes, may be empty): they see it on the admin page, and may delete the
    /// account. At most 10 a minute (`rate_limited`); a report of someone we reported in
    /// the last 24 hours is answered (`already_reported`) and not kept. Returns their name.
    pub async fn report(&self, user: u64, reason: &str) -> Result<ReportReply, ClientError> {
        let token = self.token();
        self.shared.api.report(&token, user, reason).await
    }

    /// The users we block, by id.
    pub async fn blocked_users(&self) -> Result<Vec<BlockedUser>, ClientError> {
        let token = self.token();
        self.shared.api.blocked_users(&token).await
    }

    /// Logs out at the router and closes the connection. Every message the application took
    /// counts as done.
    pub async fn logout(self) -> Result<(), ClientError> {
        self.shared.flush_acks().await;
        self.shared.stop.cancel();
        // A reconnect under way may be logging in again, which ends the login of the token
        // held now: wait for it, so that the logout ends the newest login rather than fail on
        // an ended one and leave the new one behind.
        let settled = self.shared.config.http_timeout + CONNECT_TIMEOUT * 2;
        let _ = tokio::time::timeout(settled, self.shared.supervised.cancelled()).await;
        let token = self.token();
        let result = self.shared.api.logout(&token).await;
        self.close().await;
        result
    }

    /// Closes the connection without logging out at the router (the server reports the
    /// session as closed). No reconnect follows. Every message the application took counts
    /// as done.
    pub async fn close(self) {
        self.shared.flush_acks().await;
        self.shared.stop.cancel();
        let conn = self.shared.conn.borrow().as_ref().map(|c| c.conn().clone());
        if let Some(conn) = conn {
            conn.close(close::code(close::NORMAL), b"bye");
        }
        if self.shared.config.endpoint.is_none() {
            // Our own socket: let the close reach the server before it goes away.
            let _ = tokio::time::timeout(Duration::from_secs(1), self.shared.endpoint.wait_idle())
                .await;
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.shared.stop.cancel();
        if let Some(conn) = self.shared.conn.borrow().as_ref().map(|c| c.conn().clone()) {
            conn.close(close::code(close::NORMAL), b"bye");
        }
    }
}

/// An established, logged-in connection.
struct Connected {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    heartbeat: Duration,
    /// The inbox's last seq if it held no entries when the server confirmed the session
    /// (`None`: entries wait, unknown, or not a first login, which always pulls).
    inbox_caught_up_to: Option<u64>,
    /// Most sends the server takes on one stream (0 or 1: one per stream).
    max_sends_per_stream: u32,
    /// The largest body the server takes (0: it did not say).
    max_body_bytes: u32,
}

/// Connects and logs in on the control stream, giving up after `timeout`. With `resume`
/// (reconnecting to the server we were on), tries 0-RTT when a resumption ticket is cached.
/// Returns whether 0-RTT was used.
async fn connect(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    server_name: &str,
    token: &str,
    last_seen_seq: u64,
    resume: bool,
    timeout: Duration,
) -> Result<(Connected, bool), ClientError> {
    let attempt = async {
        let connecting = endpoint
            .connect(addr, server_name)
            .map_err(|e| ClientError::Connection(e.to_string()))?;
        let early = if resume {
            connecting.into_0rtt()
        } else {
            Err(connecting)
        };
        match early {
            Ok((conn, accepted)) => {
                // The login rides in 0-RTT; it is idempotent (the same token, the same session).
                let early = login_exchange(&conn, token, last_seen_seq).await;
                if accepted.await
                    && let Ok(connected) = early
                {
                    return Ok((connected, true));
                }
                login_exchange(&conn, token, last_seen_seq)
                    .await
                    .map(|c| (c, false))
            }
            Err(connecting) => {
                let conn = connecting.await?;
                login_exchange(&conn, token, last_seen_seq)
                    .await
                    .map(|c| (c, false))
            }
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| ClientError::Timeout)?
}

async fn login_exchange(
    conn: &quinn::Connection,
    token: &str,
    last_seen_seq: u64,
) -> Result<Connected, ClientError> {
    let (mut send, mut recv) = conn.open_bi().await?;
    let login = ClientControl {
        kind: Some(client_control::Kind::Login(Login {
            token: token.to_string(),
            last_seen_seq,
            token_renewal: true,
        })),
    };
    write_frame(&mut send, &login, MAX_CONTROL_FRAME).await?;
    let reply: ServerControl = read_required(&mut recv, MAX_CONTROL_FRAME).await?;
    match reply.kind {
        Some(server_control::Kind::LoginResult(r)) if r.code.is_empty() => Ok(Connected {
            conn: conn.clone(),
            send,
            recv,
            heartbeat: Duration::from_millis(r.heartbeat_interval_ms.clamp(100, 600_000)),
            inbox_caught_up_to: r.inbox_caught_up_to,
            max_sends_per_stream: r.max_sends_per_stream,
            max_body_bytes: r.max_body_bytes,
        }),
        Some(server_control::Kind::LoginResult(r)) => {
            conn.close(close::code(close::NORMAL), b"login refused");
            Err(ClientError::LoginRefused {
                code: r.code,
                message: r.message,
            })
        }
        _ => Err(ClientError::Protocol("expected LoginResult".into())),
    }
}

/// Why a connection ended.
enum End {
    Kicked(String),
    Drain(String),
    Lost(String),
    Stopped,
}

/// Runs connections one after another until the client stops or is kicked.
async fn supervise(shared: Arc<Shared>, first: Connected, status: StatusEvents) {
    let _ended = shared.supervised.clone().drop_guard();
    let mut connected = first;
    // Connections that end soon after they began (a server that takes the login and hangs
    // up, or closes on a limit at once) are a streak: each reconnect waits longer. Else the
    // first attempt of each reconnect went at once, a reconnect (and its catch-up pull) per
    // round trip.
    let (base, max) = shared.config.backoff;
    let mut short_lived = Backoff::new(base, max);
    loop {
        let began = tokio::time::Instant::now();
        let lasted_enough = connected.heartbeat.max(MIN_STEADY_CONNECTION);
        let end = run_connection(&shared, connected).await;
        shared.conn.send_replace(None);
        let pause = if began.elapsed() >= lasted_enough {
            short_lived = Backoff::new(base, max);
            Duration::ZERO
        } else {
            short_lived.next_delay(rand::random())
        };
        let mut relogin = false;
        let event = match end {
            End::Stopped => return,
            End::Kicked(reason) => {
                status.emit(Event::Kicked(reason));
                shared.stop.cancel();
                return;
            }
            End::Drain(reason) => {
                relogin = true;
                Event::Drain(reason)
            }
            End::Lost(reason) => Event::Disconnected(reason),
        };
        status.emit(event);
        if !shared.config.reconnect {
            shared.stop.cancel();
            return;
        }
        if !pause.is_zero() {
            tracing::debug!(?pause, "connection ended soon after it began; waiting");
        }
        match reconnect(&shared, relogin, &status, pause).await {
            Some((mut next, info)) => {
                status.emit(Event::Reconnected(info));
                // A reconnect always catches up. When it resumes the same session, the old
                // connection's end may still be on its way to the router and release the
                // route after the new one was confirmed; the pull covers what was stored until
                // then, and the server's route renewal puts the route back.
                next.inbox_caught_up_to = None;
                connected = next;
            }
            None => return,
        }
    }
}

/// The session's own events (kicked, drained, disconnected, reconnected), handed to the
/// application in order by a task of their own: the supervisor never waits for room in the
/// application's event queue. An application that is a full queue behind, waiting on a send
/// that waits for the reconnect, held up both until the send timed out. The events end (see
/// [`Events::next`]) once the supervisor has dropped this and every one is handed over.
struct StatusEvents {
    queue: mpsc::UnboundedSender<Event>,
    backlog: Arc<Pending>,
}

impl StatusEvents {
    /// Starts the task that hands status events to `events`, counting them in `backlog`;
    /// `ended` is cancelled once it is done.
    fn start(events: mpsc::Sender<Event>, backlog: Arc<Pending>, ended: CancellationToken) -> Self {
        let (queue, mut queued) = mpsc::unbounded_channel();
        let handing = backlog.clone();
        tokio::spawn(async move {
            let _ended = ended.drop_guard();
            while let Some(event) = queued.recv().await {
                if events.send(event).await.is_err() {
                    // No application takes events any more: nothing waits for these. Each
                    // one queued is counted off as it is taken out (an `emit` after the close
                    // counts its own off), so the count reaches zero whatever raced in.
                    handing.done();
                    queued.close();
                    while queued.recv().await.is_some() {
                        handing.done();
                    }
                    return;
                }
                handing.done();
            }
        });
        Self { queue, backlog }
    }

    fn emit(&self, event: Event) {
        self.backlog.add();
        if self.queue.send(event).is_err() {
            self.backlog.done();
        }
    }
}

/// Re-establishes the session after `first_delay`: resume on the same server first (unless
/// `relogin`), then log in again through the router, with jittered exponential backoff.
/// `None` if the client stopped.
async fn reconnect(
    shared: &Arc<Shared>,
    mut relogin: bool,
    status: &StatusEvents,
    first_delay: Duration,
) -> Option<(Connected, Reconnected)> {
    let (base, max) = shared.config.backoff;
    let mut backoff = Backoff::new(base, max);
    let mut resume_failures = 0;
    // A client told to drain goes to the router and never back to the server it left.
    let may_resume = !relogin;
    // The first resume is short; once the router has said the server still holds the
    // session, resumes get a first connect's time (a slow path, not a dead server).
    let mut resume_timeout = RESUME_TIMEOUT;
    // Set once a re-login got a grant (`true`: by token), even if its connect then failed:
    // the session is a new login from then on, also when it is finally resumed.
    let mut logged_in_again: Option<bool> = None;
    let mut failures = 0u32;
    let mut delay = first_delay;
    loop {
        if !delay.is_zero() {
            tokio::select! {
                _ = shared.stop.cancelled() => return None,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        if shared.stop.is_cancelled() {
            return None;
        }
        // Not the inbox lock: a delivery holding it while the application's event queue is
        // full would hold up the reconnect too.
        let last_seq = shared.delivered_seq.load(Ordering::Relaxed);
        let attempt = if relogin {
            relogin_once(shared, last_seq, &mut logged_in_again).await
        } else {
            let (token, addr) = {
                let current = shared.current();
                (current.token.clone(), current.info.server_addr)
            };
            let result = connect(
                &shared.endpoint,
                shared.target(addr),
                &transport::server_name(&addr),
                &token,
                last_seq,
                true,
                resume_timeout,
            )
            .await;
            match result {
                Ok((connected, zero_rtt)) => Ok((connected, zero_rtt)),
                Err(e) => {
                    resume_failures += 1;
                    // A refused login (session replaced, token expired) or a server that keeps
                    // failing means the session must be rebuilt through the router.
                    if matches!(e, ClientError::LoginRefused { .. })
                        || resume_failures >= RESUME_ATTEMPTS
                    {
                        relogin = true;
                    }
                    Err(e)
                }
            }
        };
        match attempt {
            // Stopped (closed, logged out) while the attempt ran: the connection it made is
            // not wanted. A re-login's grant is kept in `current`, so a logout ends it.
            Ok((connected, _)) if shared.stop.is_cancelled() => {
                connected.conn.close(close::code(close::NORMAL), b"bye");
                return None;
            }
            Ok((connected, zero_rtt)) => {
                let info = Reconnected {
                    server_id: shared.current().info.server_id.clone(),
                    relogin: logged_in_again.is_some(),
                    zero_rtt,
                };
                let mut stats = shared.stats();
                stats.reconnects += 1;
                stats.relogins += u64::from(logged_in_again.is_some());
                stats.token_relogins += u64::from(logged_in_again == Some(true));
                stats.zero_rtt += u64::from(zero_rtt);
                return Some((connected, info));
            }
            // The password is no longer accepted, or another login of the user replaced this
            // one while it was away (the newer login wins, as it would have with this client
            // connected to hear the Kick): the session is over.
            Err(ClientError::Api { code, .. })
                if code == "invalid_credentials" || code == "logged_in_elsewhere" =>
            {
                let reason = if code == "invalid_credentials" {
                    "credentials no longer accepted (the account is gone or its password changed)"
                } else {
                    "logged in elsewhere"
                };
                status.emit(Event::Kicked(reason.into()));
                shared.stop.cancel();
                return None;
            }
            // The router still sees the session on a live server: the server was only out of
            // reach (or not yet known dead), so resuming there is the way back.
            Err(ClientError::Api { code, .. }) if code == "session_live" && may_resume => {
                tracing::debug!("session still live on its server; resuming there");
                relogin = false;
                resume_failures = 0;
                resume_timeout = CONNECT_TIMEOUT;
            }
            Err(e) => {
                // A blip is only worth a debug line; a reconnect that keeps failing is told
                // to the application at the 4th, 8th, 16th... attempt.
                failures += 1;
                if failures >= 4 && failures.is_power_of_two() {
                    tracing::info!(error = %e, attempts = failures, "still reconnecting");
                    status.emit(Event::Reconnecting {
                        attempts: failures,
                        error: e.to_string(),
                    });
                } else {
                    tracing::debug!(error = %e, relogin, "reconnect attempt failed");
                }
            }
        }
        delay = backoff.next_delay(rand::random());
    }
}

/// Logs in again through the router: with the session token while it is accepted (no password
/// hash on the router, so a dead server's clients come back fast), else with the password.
/// Returns the connection and whether it used 0-RTT; `granted` is set once the router granted
/// the login (to whether the token did it), even if the connect then fails.
async fn relogin_once(
    shared: &Arc<Shared>,
    last_seq: u64,
    granted: &mut Option<bool>,
) -> Result<(Connected, bool), ClientError> {
    let token = shared.current().token.clone();
    let (grant, by_token) = match shared.api.relogin(&token).await {
        Ok(grant) => (grant, true),
        Err(ClientError::Api { code, message, .. }) if TOKEN_REFUSALS.contains(&code.as_str()) => {
            tracing::debug!(%code, %message, "token re-login refused; using the password");
            let password = shared.password();
            let grant = shared.api.login(&shared.name, &password, true).await?;
            (grant, false)
        }
        Err(e) => return Err(e),
    };
    // Kept before connecting: the old token's login has ended, so if this connect fails the
    // next re-login must use the new token (its login is still pending, which the router
    // accepts) rather than fall back to the password.
    *shared.current() = Current {
        info: grant.session_info(),
        token: grant.token.clone(),
    };
    *granted = Some(by_token);
    let (connected, zero_rtt) = connect(
        &shared.endpoint,
        shared.target(grant.server_addr),
        &transport::server_name(&grant.server_addr),
        &grant.token,
        last_seq,
        false,
        CONNECT_TIMEOUT,
    )
    .await?;
    Ok((connected, zero_rtt))
}

/// Serves one connection: heartbeats and control frames, deliveries, catch-up pull.
async fn run_connection(shared: &Arc<Shared>, connected: Connected) -> End {
    let Connected {
        conn,
        mut send,
        recv,
        heartbeat,
        inbox_caught_up_to,
        max_sends_per_stream,
        max_body_bytes,
    } = connected;
    shared
        .max_body_bytes
        .store(max_body_bytes, Ordering::Relaxed);
    shared
        .conn
        .send_replace(Some(SendQueue::new(conn.clone(), max_sends_per_stream)));
    // Catch up on everything stored while we were away, unless the server says the inbox held
    // nothing when this session began: then everything up to its last seq was delivered
    // before (to this client or an earlier one of the user's) and every later entry is pushed
    // to this connection. Done before deliveries are read, so that none is taken for old.
    match inbox_caught_up_to {
        Some(last) => {
            let mut inbox = shared.inbox.lock().await;
            inbox.start_after(last);
            shared.delivered_seq.store(inbox.last(), Ordering::Relaxed);
        }
        None => shared.gap.notify_one(),
    }
    let deliveries = tokio::spawn(accept_deliveries(shared.clone(), conn.clone()));

    let (frames_tx, mut frames) = mpsc::channel(4);
    let mut recv = recv;
    let reader = tokio::spawn(async move {
        loop {
            let frame = read_frame::<ServerControl, _>(&mut recv, MAX_CONTROL_FRAME).await;
            let done = !matches!(frame, Ok(Some(_)));
            if frames_tx.send(frame).await.is_err() || done {
                return;
            }
        }
    });
    let timeout = shared.config.heartbeat_timeout.unwrap_or(heartbeat * 3);
    let mut ticker = tokio::time::interval(heartbeat);
    // After a stall (a suspended laptop, a starved process) one ping, not every missed one
    // back to back: the server closes a session that pings past its limit.
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let idle_pull_pings =
        (shared.config.idle_pull_every.as_millis() / heartbeat.as_millis().max(1)).max(1) as u64;
    // Clients that reconnected together (after a server's drain) pull at different moments.
    let idle_pull_phase = rand::random::<u64>() % idle_pull_pings;
    let mut ticks = 0u64;
    let mut nonce = 0u64;
    // The highest dropped-delivery mark a pull was asked for, and at which ping. A mark is
    // pulled for once, and again only after `MISSED_REPULL_PINGS` more (in case that pull
    // failed): entries behind it that another client of the user got and acked are gone from
    // the inbox, so this client may never reach the mark, and pulling at every pong would
    // not help.
    let mut missed_pulled = (0u64, 0u64);
    // The ping whose pong a closing client waits for.
    let mut flush_nonce = None;
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let end = loop {
        tokio::select! {
            _ = shared.stop.cancelled() => break End::Stopped,
            _ = ticker.tick() => {
                ticks += 1;
                nonce += 1;
                // A safety net for deliveries lost where no one could tell (a router's push
                // that failed): a pull now and then, however quiet the session. Not at the
                // first tick, as the connection begins: it was just told it is caught up, or
                // pulls to catch up anyway.
                if ticks > 1 && (ticks + idle_pull_phase).is_multiple_of(idle_pull_pings) {
                    shared.gap.notify_one();
                }
                if let Err(e) = ping(&mut send, nonce, &shared.progress, false).await {
                    break lost_or_closed(&conn, format!("control stream failed: {e}"));
                }
            }
            _ = shared.ack_flush.notified() => {
                nonce += 1;
                flush_nonce = Some(nonce);
                if let Err(e) = ping(&mut send, nonce, &shared.progress, true).await {
                    break lost_or_closed(&conn, format!("control stream failed: {e}"));
                }
            }
            frame = frames.recv() => {
                let kind = match frame {
                    Some(Ok(Some(control))) => control.kind,
                    Some(Ok(None)) => break lost_or_closed(&conn, "server ended the control stream".into()),
                    Some(Err(e)) => break lost_or_closed(&conn, format!("control stream: {e}")),
                    None => break lost_or_closed(&conn, "control stream closed".into()),
                };
                match kind {
                    Some(server_control::Kind::Pong(pong)) => {
                        deadline.as_mut().reset(tokio::time::Instant::now() + timeout);
                        if flush_nonce == Some(pong.nonce) {
                            shared.ack_flushed.notify_waiters();
                        }
                        // The server dropped deliveries we have not got by other means: pull.
                        let (pulled_for, pulled_at) = missed_pulled;
                        if pong.missed_up_to > shared.delivered_seq.load(Ordering::Relaxed)
                            && (pong.missed_up_to > pulled_for
                                || nonce >= pulled_at + MISSED_REPULL_PINGS)
                        {
                            missed_pulled = (pong.missed_up_to, nonce);
                            shared.gap.notify_one();
                        }
                    }
                    Some(server_control::Kind::Kick(kick)) => {
                        conn.close(close::code(close::KICKED), b"kicked");
                        break End::Kicked(kick.reason);
                    }
                    Some(server_control::Kind::Presence(p)) => {
                        let mut known = shared.known_presence.lock().unwrap_or_else(|p| p.into_inner());
                        if known.is_news(p.user_id, p.online) {
                            let event = Event::Presence { user_id: p.user_id, name: p.name, online: p.online };
                            if notice(&shared.events, event) {
                                known.told(p.user_id, p.online);
                            }
                        }
                    }
                    Some(server_control::Kind::GroupChange(c)) => {
                        let by = (c.by_user_id != 0).then_some((c.by_user_id, c.by_name));
                        let event = Event::GroupChange { group: c.group, user_id: c.user_id, name: c.name, joined: c.joined, by };
                        let _ = notice(&shared.events, event);
                    }
                    Some(server_control::Kind::GroupOwner(o)) => {
                        let event = Event::GroupOwner { group: o.group, previous_owner_id: o.previous_owner_id, previous_owner_name: o.previous_owner_name, handed_over: o.handed_over };
                        let _ = notice(&shared.events, event);
                    }
                    Some(server_control::Kind::GroupInvite(i)) => {
                        let event = Event::GroupInvite { group: i.group, by_user_id: i.by_user_id, by_name: i.by_name };
                        let _ = notice(&shared.events, event);
                    }
                    Some(server_control::Kind::GroupOwnerChange(o)) => {
                        let event = Event::GroupOwnerChange { group: o.group, owner_id: o.owner_id, owner_name: o.owner_name, previous_owner_id: o.previous_owner_id, previous_owner_name: o.previous_owner_name, handed_over: o.handed_over };
                        let _ = notice(&shared.events, event);
                    }
                    Some(server_control::Kind::ReadReceipt(r)) => {
                        let event = Event::Read(ReadReceipt { user_id: r.reader_id, name: r.reader_name, up_to_msg_id: r.up_to_msg_id, read_at_ms: r.read_at_ms });
                        let _ = notice(&shared.events, event);
                    }
                    Some(server_control::Kind::Drain(drain)) => {
                        conn.close(close::code(close::DRAIN), b"draining");
                        break End::Drain(drain.reason);
                    }
                    Some(server_control::Kind::TokenRenewal(renewal)) => {
                        shared.current().token = renewal.token;
                        shared.stats().token_renewals += 1;
                    }
                    Some(server_control::Kind::LoginResult(_)) => {
                        break End::Lost("unexpected login result on the control stream".into());
                    }
                    // A kind this client does not know (from a newer server): ignored.
                    None => {}
                }
            }
            _ = &mut deadline => {
                conn.close(close::code(close::TIMEOUT), b"heartbeat timeout");
                break End::Lost(format!("no heartbeat from server for {} ms", timeout.as_millis()));
            }
            closed = conn.closed() => break closed_by_server(closed),
        }
    };
    reader.abort();
    deliveries.abort();
    end
}

/// Passes a presence or group change to the application, and says whether it did. Best
/// effort, as on the server: an application behind on its events misses the change rather
/// than stalling the heartbeat.
fn notice(events: &mpsc::Sender<Event>, event: Event) -> bool {
    let passed = events.try_send(event).is_ok();
    if !passed {
        tracing::debug!("events backed up; a presence or group change was dropped");
    }
    passed
}

/// Sends a heartbeat ping, which also acknowledges what the application is done with (and
/// when `closing`, has the server trim the inbox before its pong).
async fn ping(
    send: &mut quinn::SendStream,
    nonce: u64,
    progress: &Progress,
    closing: bool,
) -> Result<(), FrameError> {
    let ping = Ping {
        nonce,
        processed_up_to: progress.processed.load(Ordering::Relaxed),
        closing,
    };
    let control = ClientControl {
        kind: Some(client_control::Kind::Ping(ping)),
    };
    write_frame(send, &control, MAX_CONTROL_FRAME).await
}

/// How a failed control stream ends the session: as the connection's close, if it was closed
/// (the stream's own error only says "connection lost", and which of the two the control
/// loop sees first is chance), else as `lost`. A kick or a drain told by the close code must
/// not pass for a lost connection.
fn lost_or_closed(conn: &quinn::Connection, lost: String) -> End {
    match conn.close_reason() {
        Some(closed) => closed_by_server(closed),
        None => End::Lost(lost),
    }
}

/// How a connection the server closed ends the session: a server that ends a session without
/// its Kick or Drain frame (its control stream was backed up) says which in the close code.
fn closed_by_server(closed: quinn::ConnectionError) -> End {
    if let quinn::ConnectionError::ApplicationClosed(app) = &closed {
        let reason = String::from_utf8_lossy(&app.reason).into_owned();
        if app.error_code == close::code(close::KICKED) {
            return End::Kicked(reason);
        }
        if app.error_code == close::code(close::DRAIN) {
            return End::Drain(reason);
        }
    }
    End::Lost(closed.to_string())
}

/// Accepts one stream per pushed batch (usually one message), hands the messages on in
/// order, and acks what we have.
async fn accept_deliveries(shared: Arc<Shared>, conn: quinn::Connection) {
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        let shared = shared.clone();
        tokio::spawn(async move {
            let batch: DeliveryBatch =
                match read_only_frame(&mut recv, cim_proto::DEFAULT_MAX_FRAME).await {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::warn!(error = %e, "bad delivery frame");
                        let _ = send.reset(close::code(close::PROTOCOL));
                        return;
                    }
                };
            let msg_id = batch.deliveries.last().map_or(0, |d| d.msg_id);
            // Waiting here when the application is slow pushes back on the server instead of
            // buffering without bound.
            let have = shared.accept_deliveries(batch.deliveries, None).await;
            let ack = DeliveryAck {
                msg_id,
                seq: shared.progress.ack_up_to(have),
            };
            if write_frame(&mut send, &ack, 1024).await.is_ok() {
                let _ = send.finish();
            }
            transport::take_end(&mut recv);
        });
    }
}

/// Pulls missing entries: on every (re)connect, and when a delivery arrives ahead of a gap
/// that does not fill by itself within [`GAP_WAIT`].
async fn fill_gaps(shared: Arc<Shared>) {
    loop {
        tokio::select! {
            _ = shared.stop.cancelled() => return,
            _ = shared.gap.notified() => {}
        }
        tokio::select! {
            _ = shared.stop.cancelled() => return,
            _ = tokio::time::sleep(GAP_WAIT) => {}
        }
        if let Err(e) = pull_all(&shared).await {
            tracing::debug!(error = %e, "pull failed");
            // Try again shortly; a reconnect also triggers a pull.
            let retry = shared.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(500)).await;
                retry.gap.notify_one();
            });
        }
    }
}

/// Pulls pages until the inbox has nothing after what we hold.
async fn pull_all(shared: &Arc<Shared>) -> Result<(), ClientError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let conn = shared.live_conn(deadline).await?;
        // Never past what the application got; the trim never past what it is done with.
        let after = {
            let inbox = shared.inbox.lock().await;
            inbox
                .last()
                .min(shared.delivered_seq.load(Ordering::Relaxed))
        };
        let request = ClientRequest {
            kind: Some(client_request::Kind::Pull(Pull {
                after_seq: after,
                limit: PULL_LIMIT,
                trim_up_to: Some(shared.progress.ack_up_to(after)),
            })),
        };
        let page: PullResult = tokio::time::timeout(SEND_ATTEMPT_TIMEOUT, async {
            let (mut send, mut recv) = conn.open_bi().await?;
            write_frame(&mut send, &request, 1024).await?;
            send.finish()?;
            Ok::<_, ClientError>(read_only_frame(&mut recv, MAX_PULL_FRAME).await?)
        })
        .await
        .map_err(|_| ClientError::Timeout)??;
        if !page.code.is_empty() {
            return Err(ClientError::SendRefused {
                code: page.code,
                message: page.message,
            });
        }
        shared.stats().pulls += 1;
        let first = page.deliveries.first().map(|d| d.seq);
        let more = page.more;
        let have = shared.accept_deliveries(page.deliveries, first).await;
        if !more || have <= after {
            return Ok(());
        }
    }
}
