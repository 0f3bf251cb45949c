//! cim connection server.
//!
//! A server holds clients' QUIC connections. Each client opens a control stream (login with a
//! router-signed token, heartbeats, kick and drain) and one stream per message. The server
//! forwards client messages to a router and delivers the router's pushes to its local sessions.
//! Routers dial the server's internal endpoint (mutual TLS); the server uses those same
//! connections to reach the routers, so it needs no router addresses of its own.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cim_core::discovery::{Discovery, ServerInfo};
use cim_core::token::TokenKey;
use cim_core::transport::{self, Link};
use cim_core::{ALPN_CLIENT, ALPN_INTERNAL, close, tls};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

mod links;
mod mailbox;
mod ops;
mod outbox;
mod resumption;
mod session;

/// TLS sessions remembered for 0-RTT resumption.
const RESUMPTION_CACHE: usize = 65_536;

pub use links::RouterLinks;

/// Everything a server needs to start.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Unique id, announced through discovery and embedded in tokens.
    pub id: String,
    /// Address clients connect to.
    pub client_addr: SocketAddr,
    /// Address routers connect to.
    pub internal_addr: SocketAddr,
    /// IP announced in discovery when the endpoints are bound to an unspecified address.
    pub advertise_ip: Option<std::net::IpAddr>,
    /// Certificate chain presented on both endpoints (PEM).
    pub cert: PathBuf,
    /// Private key for `cert` (PEM).
    pub key: PathBuf,
    /// CA that router client certificates must chain to (PEM).
    pub ca: PathBuf,
    /// Verifies session tokens, and signs the fresh ones handed to connected clients.
    pub token_key: TokenKey,
    /// Lifetime of a fresh token (keep equal to the routers' token lifetime). A session gets
    /// one when its token has less than half of this left.
    pub token_ttl: Duration,
    /// Interval at which clients are asked to ping.
    pub heartbeat_interval: Duration,
    /// A client silent for this long is disconnected.
    pub heartbeat_timeout: Duration,
    /// Largest message body accepted from a client, in bytes.
    pub max_body_bytes: usize,
    /// How long shutdown waits for clients to leave after `Drain`.
    pub drain_grace: Duration,
    /// How often the routes of open sessions are renewed (keep well under the router's route
    /// lease).
    pub renew_interval: Duration,
    /// How long the server may have no router linked before it moves its clients off (drains
    /// them): their sends would be refused and no push would come, while heartbeats alone
    /// kept them there for as long as the cut lasted.
    pub routerless_drain_after: Duration,
    /// Caps on what peers may use.
    pub limits: Limits,
    /// What the server counts.
    pub metrics: Arc<cim_core::metrics::ServerMetrics>,
    /// Plain-HTTP address of `/metrics`, `/health`, `/ready` (`None`: not served).
    pub ops_addr: Option<SocketAddr>,
    /// Registry served on `/metrics`.
    pub registry: Option<Arc<cim_core::metrics::Registry>>,
}

/// Caps on what clients may use. Over a cap a client gets a clear refusal; a client that keeps
/// pushing is disconnected. Other clients are unaffected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Client connections on this server.
    pub max_connections: usize,
    /// Client connections from one IP address.
    pub max_connections_per_ip: usize,
    /// Sustained messages per second per session (sends beyond get `rate_limited`).
    pub messages_per_sec: u32,
    /// Burst of messages a session may send at once.
    pub message_burst: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 100_000,
            max_connections_per_ip: 1_000,
            messages_per_sec: 200,
            message_burst: 400,
        }
    }
}

impl ServerConfig {
    /// How often open sessions' routes are renewed unless set otherwise.
    pub const DEFAULT_RENEW_INTERVAL: Duration = Duration::from_secs(10);
    /// How long a server stays without routers before draining its clients, unless set
    /// otherwise: over a ZooKeeper session expiry (routers drop a server whose node is gone)
    /// and the redial after it, with room to spare.
    pub const DEFAULT_ROUTERLESS_DRAIN_AFTER: Duration = Duration::from_secs(20);

    /// Defaults for everything but identity, addresses and credentials.
    pub fn new(
        id: impl Into<String>,
        client_addr: SocketAddr,
        internal_addr: SocketAddr,
        cert: PathBuf,
        key: PathBuf,
        ca: PathBuf,
        token_key: TokenKey,
    ) -> Self {
        Self {
            id: id.into(),
            client_addr,
            internal_addr,
            advertise_ip: None,
            cert,
            key,
            ca,
            token_key,
            token_ttl: Duration::from_secs(600),
            heartbeat_interval: Duration::from_secs(5),
            heartbeat_timeout: Duration::from_secs(15),
            max_body_bytes: cim_proto::DEFAULT_MAX_BODY_BYTES,
            drain_grace: Duration::from_secs(2),
            renew_interval: Self::DEFAULT_RENEW_INTERVAL,
            routerless_drain_after: Self::DEFAULT_ROUTERLESS_DRAIN_AFTER,
            limits: Limits::default(),
            metrics: Arc::new(cim_core::metrics::ServerMetrics::unregistered()),
            ops_addr: None,
            registry: None,
        }
    }
}

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Certificates or keys could not be loaded.
    #[error("tls: {0}")]
    Tls(#[from] tls::TlsError),
    /// An endpoint could not be bound.
    #[error("endpoint: {0}")]
    Endpoint(#[from] transport::EndpointError),
    /// The server could not be announced.
    #[error("discovery: {0}")]
    Discovery(#[from] cim_core::discovery::DiscoveryError),
    /// The configuration is unusable.
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// A server whose endpoints are bound but which is not yet serving.
pub struct Server {
    config: Arc<ServerConfig>,
    client_endpoint: quinn::Endpoint,
    internal_endpoint: quinn::Endpoint,
    /// The ops endpoint's socket, bound with the others so that its port is known at once.
    ops_listener: Option<std::net::TcpListener>,
}

/// The ops endpoint's listening socket, ready for tokio to take over.
fn bind_ops(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

impl Server {
    /// Binds both endpoints. Port 0 picks free ports; see [`Server::client_addr`].
    pub fn bind(config: ServerConfig) -> Result<Self, StartError> {
        if config.id.is_empty() || config.id.contains(['|', '/']) {
            return Err(StartError::Config(
                "server id must be non-empty without '|' or '/'".into(),
            ));
        }
        let mut client_tls = tls::server_config(&config.cert, &config.key, &[ALPN_CLIENT], None)?;
        // 0-RTT resumption for reconnecting clients: QUIC requires the maximum early data
        // size to be exactly u32::MAX. Resumption state lives in memory (lost on restart,
        // which only costs a full handshake).
        client_tls.max_early_data_size = u32::MAX;
        client_tls.session_storage = Arc::new(resumption::ResumptionStore::new(RESUMPTION_CACHE));
        // One ticket per handshake is all a client uses (a resumption issues a fresh one);
        // each is held in server memory until used or evicted.
        client_tls.send_tls13_tickets = 1;
        let internal_tls = tls::server_config(
            &config.cert,
            &config.key,
            &[ALPN_INTERNAL],
            Some(tls::load_roots(&config.ca)?),
        )?;
        let client_endpoint =
            transport::server_endpoint(config.client_addr, client_tls, Link::Client)?;
        let internal_endpoint =
            transport::server_endpoint(config.internal_addr, internal_tls, Link::Internal)?;
        let ops_listener = match config.ops_addr {
            Some(addr) => Some(
                bind_ops(addr)
                    .map_err(|e| StartError::Config(format!("binding --metrics {addr}: {e}")))?,
            ),
            None => None,
        };
        Ok(Self {
            config: Arc::new(config),
            client_endpoint,
            internal_endpoint,
            ops_listener,
        })
    }

    /// Bound ops (`--metrics`) address, if there is an ops endpoint.
    pub fn ops_addr(&self) -> Option<SocketAddr> {
        self.ops_listener.as_ref()?.local_addr().ok()
    }

    /// Bound client address.
    pub fn client_addr(&self) -> SocketAddr {
        self.client_endpoint
            .local_addr()
            .unwrap_or(self.config.client_addr)
    }

    /// Bound internal address.
    pub fn internal_addr(&self) -> SocketAddr {
        self.internal_endpoint
            .local_addr()
            .unwrap_or(self.config.internal_addr)
    }

    /// Server id.
    pub fn id(&self) -> &str {
        &self.config.id
    }

    /// Announces the server and serves until `shutdown` is cancelled, then drains: clients get
    /// `Drain`, the server leaves discovery, and connections close after the grace period.
    pub async fn run(
        self,
        discovery: Arc<dyn Discovery>,
        shutdown: CancellationToken,
    ) -> Result<(), StartError> {
        let advertise = |mut addr: SocketAddr| {
            if let Some(ip) = self.config.advertise_ip {
                addr.set_ip(ip);
            }
            addr
        };
        let info = ServerInfo {
            id: self.config.id.clone(),
            client_addr: advertise(self.client_addr()),
            internal_addr: advertise(self.internal_addr()),
            load: 0,
            incarnation: rand::random(),
        };
        let state = Arc::new(session::State::new(self.config.clone()));
        let tracker = TaskTracker::new();
        tracker.spawn(links::accept_routers(
            self.internal_endpoint.clone(),
            state.clone(),
            shutdown.clone(),
        ));
        tracker.spawn(session::accept_clients(
            self.client_endpoint.clone(),
            state.clone(),
            tracker.clone(),
            shutdown.clone(),
        ));
        if let Some(listener) = self.ops_listener {
            let listener = tokio::net::TcpListener::from_std(listener)
                .map_err(|e| StartError::Config(format!("serving --metrics: {e}")))?;
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, "ops endpoint");
            }
            tracker.spawn(ops::serve(
                listener,
                self.config.registry.clone(),
                state.clone(),
                shutdown.clone(),
            ));
        }
        links::run_batches(&state);
        tracker.spawn(renew_routes(state.clone(), shutdown.clone()));
        tracker.spawn(report_acks(state.clone(), shutdown.clone()));
        tracker.spawn(drain_when_routerless(state.clone(), shutdown.clone()));
        tracker.spawn(report_load(
            discovery.clone(),
            state.clone(),
            shutdown.clone(),
        ));
        discovery.register_server(info.clone()).await?;
        tracing::info!(
            id = %info.id,
            client_addr = %info.client_addr,
            internal_addr = %info.internal_addr,
            "server started"
        );

        shutdown.cancelled().await;
        tracing::info!(id = %self.config.id, "server draining");
        // Out of discovery first, so routers assign no more logins here (one that comes is
        // refused `draining`); they keep a working link to a server out of discovery for a
        // while (`DEPARTURE_GRACE`), long enough for the acks it holds to be reported.
        state.refuse_logins();
        if let Err(e) = discovery.deregister_server(&self.config.id).await {
            tracing::warn!(error = %e, "could not deregister from discovery");
        }
        report_acks_once(&state, Duration::from_secs(1)).await;
        state.drain_all("server shutting down");
        let drained = tokio::time::timeout(self.config.drain_grace, state.wait_empty()).await;
        if drained.is_err() {
            tracing::warn!(left = state.session_count(), "drain grace period over");
        }
        // The acks the clients sent while they left (their closing pings), while the routers'
        // links are still up.
        report_acks_once(&state, Duration::from_secs(1)).await;
        self.client_endpoint
            .close(close::code(close::DRAIN), b"server shutting down");
        self.internal_endpoint
            .close(close::code(close::NORMAL), b"server shutting down");
        tracker.close();
        let _ = tokio::time::timeout(Duration::from_secs(1), tracker.wait()).await;
        Ok(())
    }
}

/// Renews the routes of open sessions periodically, so routes of a server that died lapse.
async fn renew_routes(state: Arc<session::State>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(state.config.renew_interval);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => links::renew_sessions(&state, None).await,
        }
    }
}

/// Reports clients' inbox acknowledgements to a router twice a second, so inboxes shrink (the
/// last report, at shutdown, is [`Server::run`]'s, right after it leaves discovery). A report no
/// router took is kept for the next one (a newer ack of the same user replaces it): an
/// untrimmed entry would reach the user's next new client again, since a client that starts
/// pulls everything its inbox still holds.
async fn report_acks(state: Arc<session::State>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => report_acks_once(&state, ACK_REPORT_TIMEOUT).await,
        }
    }
}

/// Longest a periodic ack report may take (routers tried in turn, each for a while).
const ACK_REPORT_TIMEOUT: Duration = Duration::from_secs(30);

/// Reports the acknowledgements recorded since the last report, giving up after `within`;
/// keeps them if no router took them.
async fn report_acks_once(state: &session::State, within: Duration) {
    let acked = state.take_acks();
    if acked.is_empty() {
        return;
    }
    let error = match tokio::time::timeout(within, state.links.trim(&acked)).await {
        Ok(Ok(())) => return,
        Ok(Err(e)) => e.to_string(),
        Err(_) => "timed out".into(),
    };
    tracing::debug!(
        error,
        users = acked.len(),
        "ack report failed; kept for the next"
    );
    for (user, seq) in acked {
        state.record_ack(user, seq);
    }
}

/// Drains the clients of a server that has had no router linked for
/// `routerless_drain_after` (a ZooKeeper partition that expired its node, say, or routers
/// that cannot reach it): routers then give them servers they can reach. Heartbeats alone
/// would keep them here, unable to send or receive, for as long as the cut lasts. New logins
/// need a router to confirm them, so none comes in meanwhile; once a router links again,
/// the server serves as before.
async fn drain_when_routerless(state: Arc<session::State>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut alone_since: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if !state.links.is_empty() {
            alone_since = None;
            continue;
        }
        let since = *alone_since.get_or_insert_with(tokio::time::Instant::now);
        if since.elapsed() >= state.config.routerless_drain_after && state.session_count() > 0 {
            tracing::warn!(
                sessions = state.session_count(),
                alone_for = ?since.elapsed(),
                "no router linked; draining clients to servers routers can reach"
            );
            state.drain_sessions("no router reaches this server");
            alone_since = Some(tokio::time::Instant::now());
        }
    }
}

/// Publishes the session count to discovery whenever it changes (checked every second).
async fn report_load(
    discovery: Arc<dyn Discovery>,
    state: Arc<session::State>,
    shutdown: CancellationToken,
) {
    let mut last = 0u32;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let load = state.session_count() as u32;
        if load != last {
            match discovery.update_server_load(&state.config.id, load).await {
                Ok(()) => last = load,
                Err(e) => tracing::debug!(error = %e, "load report failed"),
            }
        }
    }
}
