//! cim client library: register and log in through a router over HTTPS, hold one QUIC
//! connection to the assigned server, send private and group messages, and receive messages
//! and session events as an async stream or through a [`MessageHandler`].
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

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use cim_core::transport::{self, Link};
use cim_core::{ALPN_CLIENT, close, tls};
use cim_proto::v1::{
    ChatMessage, ClientControl, Delivery, DeliveryAck, Login, Ping, SendAck, ServerControl,
    chat_message::Target, client_control, server_control,
};
use cim_proto::{FrameError, read_frame, read_required, write_frame};
use tokio::sync::mpsc;

pub mod console;
mod http;

pub use http::{OnlineUser, RouterApi};

/// Largest control frame.
const MAX_CONTROL_FRAME: usize = 4 * 1024;
/// Time allowed for the QUIC handshake plus login exchange.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for a send to be acked.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// The server refused a message.
    #[error("message refused: {code}: {message}")]
    SendRefused {
        /// Stable error code, e.g. `recipient_offline`.
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
}

impl ClientError {
    /// The stable error code, when the error carries one.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { code, .. }
            | ClientError::LoginRefused { code, .. }
            | ClientError::SendRefused { code, .. } => Some(code),
            _ => None,
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
    /// Connect to this address instead of the server address the router returns (for a
    /// relay or a NAT); TLS still verifies the server's own name.
    pub server_override: Option<SocketAddr>,
    /// Local address of the QUIC socket.
    pub bind_addr: SocketAddr,
    /// Declare the server dead if no pong arrives for this long (default: three heartbeat
    /// intervals as announced by the server).
    pub heartbeat_timeout: Option<Duration>,
}

impl ClientConfig {
    /// A configuration for `router_url` trusting the CA in `ca_pem`.
    pub fn new(router_url: impl Into<String>, ca_pem: Vec<u8>) -> Self {
        Self {
            router_url: router_url.into(),
            ca_pem,
            server_override: None,
            bind_addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            heartbeat_timeout: None,
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
    /// Inbox sequence number (0 when not stored).
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
}

/// Something that happened to the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A message arrived.
    Message(IncomingMessage),
    /// The session was ended by the server because the user logged in elsewhere or logged out.
    Kicked(String),
    /// The server is shutting down; log in again for a new server.
    Drain(String),
    /// The connection to the server is gone (closed, lost, or silent past the heartbeat
    /// timeout). No further events follow.
    Disconnected(String),
}

/// The stream of [`Event`]s of one session.
pub struct Events {
    rx: mpsc::Receiver<Event>,
}

impl Events {
    /// The next event, or `None` once the session is over and every event was taken.
    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }
}

/// Receives messages, like CIM's message callback.
pub trait MessageHandler: Send {
    /// Called for each incoming message.
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
    /// Message id assigned by cim.
    pub msg_id: u64,
    /// Recipients the message was handed to.
    pub recipients: u32,
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

/// A logged-in session: one QUIC connection to the assigned server.
pub struct Client {
    info: SessionInfo,
    token: String,
    api: RouterApi,
    conn: quinn::Connection,
    endpoint: quinn::Endpoint,
    next_client_msg_id: AtomicU64,
}

struct Shared {
    events: mpsc::Sender<Event>,
    ended: AtomicBool,
}

impl Shared {
    /// Emits `Disconnected` once.
    async fn disconnected(&self, reason: String) {
        if !self.ended.swap(true, Ordering::SeqCst) {
            let _ = self.events.send(Event::Disconnected(reason)).await;
        }
    }
}

/// Creates an account through the router. Returns the new user id.
pub async fn register(
    config: &ClientConfig,
    name: &str,
    password: &str,
) -> Result<u64, ClientError> {
    RouterApi::new(config)?.register(name, password).await
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
        let roots =
            tls::roots_from_pem(&config.ca_pem).map_err(|e| ClientError::Config(e.to_string()))?;
        let tls = tls::client_config(roots, &[ALPN_CLIENT], None)
            .map_err(|e| ClientError::Config(e.to_string()))?;
        let quic = transport::client_config(tls, Link::Client)
            .map_err(|e| ClientError::Config(e.to_string()))?;
        let endpoint = transport::client_endpoint(config.bind_addr, quic)
            .map_err(|e| ClientError::Connection(e.to_string()))?;
        let target = config.server_override.unwrap_or(grant.server_addr);
        let name_for_tls = transport::server_name(&grant.server_addr);
        let connected = tokio::time::timeout(
            CONNECT_TIMEOUT,
            connect(&endpoint, target, &name_for_tls, &grant.token),
        )
        .await
        .map_err(|_| ClientError::Timeout)??;
        let (conn, send, recv, heartbeat) = connected;

        let (events_tx, events_rx) = mpsc::channel(1024);
        let shared = Arc::new(Shared {
            events: events_tx,
            ended: AtomicBool::new(false),
        });
        let heartbeat_timeout = config.heartbeat_timeout.unwrap_or(heartbeat * 3);
        tokio::spawn(control_task(
            conn.clone(),
            send,
            recv,
            heartbeat,
            heartbeat_timeout,
            shared.clone(),
        ));
        tokio::spawn(delivery_task(conn.clone(), shared));
        let info = SessionInfo {
            user_id: grant.user_id,
            name: grant.name,
            server_id: grant.server_id,
            server_addr: grant.server_addr,
        };
        let client = Client {
            info,
            token: grant.token,
            api,
            conn,
            endpoint,
            next_client_msg_id: AtomicU64::new(rand::random::<u32>() as u64 + 1),
        };
        Ok((client, Events { rx: events_rx }))
    }

    /// Who this session belongs to.
    pub fn info(&self) -> &SessionInfo {
        &self.info
    }

    /// The session token (for the router's HTTP API).
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Sends a private message to `to_user`.
    pub async fn send_private(&self, to_user: u64, body: &str) -> Result<Ack, ClientError> {
        self.send(Target::ToUser(to_user), body).await
    }

    /// Sends a message to a group; `"all"` reaches everyone online.
    pub async fn send_group(&self, group: &str, body: &str) -> Result<Ack, ClientError> {
        self.send(Target::Group(group.to_string()), body).await
    }

    async fn send(&self, target: Target, body: &str) -> Result<Ack, ClientError> {
        let message = ChatMessage {
            client_msg_id: self.next_client_msg_id.fetch_add(1, Ordering::Relaxed),
            target: Some(target),
            body: body.to_string(),
        };
        let exchange = async {
            let (mut send, mut recv) = self.conn.open_bi().await?;
            write_frame(&mut send, &message, cim_proto::DEFAULT_MAX_FRAME).await?;
            send.finish()?;
            let ack: SendAck = read_required(&mut recv, 4096).await?;
            Ok::<_, ClientError>(ack)
        };
        let ack = tokio::time::timeout(SEND_TIMEOUT, exchange)
            .await
            .map_err(|_| ClientError::Timeout)??;
        if !ack.code.is_empty() {
            return Err(ClientError::SendRefused {
                code: ack.code,
                message: ack.message,
            });
        }
        Ok(Ack {
            msg_id: ack.msg_id,
            recipients: ack.recipients,
        })
    }

    /// Users online now, whose name starts with `prefix` (empty: everyone).
    pub async fn online_users(&self, prefix: &str) -> Result<Vec<OnlineUser>, ClientError> {
        self.api.online_users(&self.token, prefix).await
    }

    /// Logs out at the router and closes the connection.
    pub async fn logout(self) -> Result<(), ClientError> {
        let result = self.api.logout(&self.token).await;
        self.close().await;
        result
    }

    /// Closes the connection without logging out at the router (the server reports the
    /// session as closed).
    pub async fn close(self) {
        self.conn.close(close::code(close::NORMAL), b"bye");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

type Connected = (
    quinn::Connection,
    quinn::SendStream,
    quinn::RecvStream,
    Duration,
);

async fn connect(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    server_name: &str,
    token: &str,
) -> Result<Connected, ClientError> {
    let conn = endpoint
        .connect(addr, server_name)
        .map_err(|e| ClientError::Connection(e.to_string()))?
        .await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let login = ClientControl {
        kind: Some(client_control::Kind::Login(Login {
            token: token.to_string(),
            last_seen_seq: 0,
        })),
    };
    write_frame(&mut send, &login, MAX_CONTROL_FRAME).await?;
    let reply: ServerControl = read_required(&mut recv, MAX_CONTROL_FRAME).await?;
    match reply.kind {
        Some(server_control::Kind::LoginResult(r)) if r.code.is_empty() => {
            let heartbeat = Duration::from_millis(r.heartbeat_interval_ms.clamp(100, 600_000));
            Ok((conn, send, recv, heartbeat))
        }
        Some(server_control::Kind::LoginResult(r)) => Err(ClientError::LoginRefused {
            code: r.code,
            message: r.message,
        }),
        _ => Err(ClientError::Protocol("expected LoginResult".into())),
    }
}

/// Pings on the control stream, watches for pongs, kicks and drains.
async fn control_task(
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    interval: Duration,
    timeout: Duration,
    shared: Arc<Shared>,
) {
    let (frames_tx, mut frames) = mpsc::channel(4);
    let reader = tokio::spawn(async move {
        loop {
            let frame = read_frame::<ServerControl, _>(&mut recv, MAX_CONTROL_FRAME).await;
            let done = !matches!(frame, Ok(Some(_)));
            if frames_tx.send(frame).await.is_err() || done {
                return;
            }
        }
    });
    let mut ticker = tokio::time::interval(interval);
    let mut nonce = 0u64;
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let reason = loop {
        tokio::select! {
            _ = ticker.tick() => {
                nonce += 1;
                let ping = ClientControl { kind: Some(client_control::Kind::Ping(Ping { nonce })) };
                if let Err(e) = write_frame(&mut send, &ping, MAX_CONTROL_FRAME).await {
                    break format!("control stream failed: {e}");
                }
            }
            frame = frames.recv() => match frame.map(|f| f.map(|o| o.and_then(|c| c.kind))) {
                Some(Ok(Some(server_control::Kind::Pong(_)))) => {
                    deadline.as_mut().reset(tokio::time::Instant::now() + timeout);
                }
                Some(Ok(Some(server_control::Kind::Kick(kick)))) => {
                    let _ = shared.events.send(Event::Kicked(kick.reason.clone())).await;
                    conn.close(close::code(close::KICKED), b"kicked");
                    break format!("kicked: {}", kick.reason);
                }
                Some(Ok(Some(server_control::Kind::Drain(drain)))) => {
                    let _ = shared.events.send(Event::Drain(drain.reason)).await;
                }
                Some(Ok(Some(server_control::Kind::LoginResult(_)))) | Some(Ok(None)) => {
                    break "server ended the control stream".into();
                }
                Some(Err(e)) => break format!("control stream: {e}"),
                None => break "control stream closed".into(),
            },
            _ = &mut deadline => {
                // Report before closing, so the closed connection is not reported first.
                let reason = format!("no heartbeat from server for {} ms", timeout.as_millis());
                shared.disconnected(reason.clone()).await;
                conn.close(close::code(close::TIMEOUT), b"heartbeat timeout");
                break reason;
            }
            closed = conn.closed() => break closed.to_string(),
        }
    };
    reader.abort();
    shared.disconnected(reason).await;
}

/// Accepts one stream per delivered message, hands it to the application and acks it.
async fn delivery_task(conn: quinn::Connection, shared: Arc<Shared>) {
    loop {
        let (mut send, mut recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => {
                shared.disconnected(e.to_string()).await;
                return;
            }
        };
        let delivery: Delivery = match read_required(&mut recv, cim_proto::DEFAULT_MAX_FRAME).await
        {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "bad delivery frame");
                let _ = send.reset(close::code(close::PROTOCOL));
                continue;
            }
        };
        let ack = DeliveryAck {
            msg_id: delivery.msg_id,
            seq: delivery.seq,
        };
        let message = IncomingMessage {
            msg_id: delivery.msg_id,
            seq: delivery.seq,
            from_user: delivery.from_user,
            from_name: delivery.from_name,
            group: (!delivery.group.is_empty()).then_some(delivery.group),
            body: delivery.body,
            created_at_ms: delivery.created_at_ms,
        };
        // Waiting here when the application is slow pushes back on the server instead of
        // buffering without bound.
        if shared.events.send(Event::Message(message)).await.is_err() {
            return;
        }
        if write_frame(&mut send, &ack, 1024).await.is_ok() {
            let _ = send.finish();
        }
    }
}
