//! cim router.
//!
//! Routers hold no client connections. They serve the HTTPS API (accounts, login with server
//! assignment, online users, HTTP sends), keep one QUIC link to each live server, and fan
//! messages out to servers: one push per server carrying its recipient list. Their state lives
//! in a [`store::Store`] (Redis in a cluster, memory in the embedded mode) and their view of the
//! servers comes from a [`cim_core::discovery::Discovery`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cim_core::discovery::{Discovery, RouterInfo};
use cim_core::token::TokenKey;
use cim_core::transport::{self, Link};
use cim_core::{ALPN_INTERNAL, tls};
use tokio_util::sync::CancellationToken;

mod admin;
pub mod api;
pub mod embedded;
pub mod https;
mod ids;
mod links;
pub mod password;
mod presence;
pub mod select;
pub mod service;
pub mod store;

pub use select::Strategy;

/// Everything a router needs to start.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// Unique router id.
    pub id: String,
    /// HTTPS listen address.
    pub http_addr: SocketAddr,
    /// Local address the router's links to servers leave from (`None`: any address of
    /// `http_addr`'s family).
    pub link_ip: Option<IpAddr>,
    /// Certificate chain for HTTPS, also presented as client certificate to servers (PEM).
    pub cert: PathBuf,
    /// Private key for `cert` (PEM).
    pub key: PathBuf,
    /// Cluster CA: server certificates must chain to it (PEM).
    pub ca: PathBuf,
    /// Signs session tokens.
    pub token_key: TokenKey,
    /// How servers are picked at login.
    pub strategy: Strategy,
    /// Lifetime of a session token.
    pub token_ttl: Duration,
    /// How long a login's claim waits for the client to reach its server.
    pub pending_lease: Duration,
    /// Lease on a confirmed route, renewed while its server is alive.
    pub route_lease: Duration,
    /// Largest message body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Caps on each user's inbox, and how long a send is remembered so a retry is stored once.
    pub inbox: store::InboxLimits,
    /// Argon2id cost of new password hashes.
    pub password_cost: password::Cost,
    /// Limits on login attempts.
    pub login_limits: LoginLimits,
    /// Limits on registrations and on other API requests.
    pub api_limits: ApiLimits,
    /// Longest an HTTPS request may take from its headers to its answer, body included: a
    /// client that trickles a body must not hold a connection (one of a bounded number) for
    /// good. Past it the request is answered `408 timeout`.
    pub http_request_timeout: Duration,
    /// Most members a group may have.
    pub max_group_size: usize,
    /// Most groups a user may be in (each is read at every login and logout of the user's,
    /// to tell its members).
    pub max_groups_per_user: usize,
    /// Lease on the router's message-id node in the store, renewed every sixth of it. A
    /// router that cannot renew it stops accepting messages when it lapses; a router that died
    /// leaves its node to others after it.
    pub id_node_lease: Duration,
    /// What the router counts.
    pub metrics: Arc<cim_core::metrics::RouterMetrics>,
    /// Registry served on `/metrics` (`None`: the endpoint answers 404).
    pub registry: Option<Arc<cim_core::metrics::Registry>>,
    /// Credential for the admin page (`None`: the admin page is off).
    pub admin_token: Option<String>,
}

/// Limits on login attempts, per router (each router counts its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginLimits {
    /// Failed logins of one user per minute before further attempts are refused for the rest
    /// of the minute (even with the right password).
    pub failures_per_user: u32,
    /// Login attempts from one IP address per minute.
    pub attempts_per_ip: u32,
}

impl Default for LoginLimits {
    fn default() -> Self {
        Self {
            failures_per_user: 5,
            attempts_per_ip: 120,
        }
    }
}

/// Limits on the API's other requests, per router (each router counts its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiLimits {
    /// Registrations from one IP address per minute (each costs a password hash and an
    /// account kept for good).
    pub registrations_per_ip: u32,
    /// Requests with a session token (sends, groups, listings) of one user's login per
    /// second (a user has one login at a time; an ended login's tokens count apart); the
    /// server limits messages sent over QUIC on its own.
    pub requests_per_user: u32,
}

impl Default for ApiLimits {
    fn default() -> Self {
        Self {
            registrations_per_ip: 20,
            requests_per_user: 100,
        }
    }
}

impl RouterConfig {
    /// Default of [`RouterConfig::http_request_timeout`].
    pub const DEFAULT_HTTP_REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

    /// Defaults for everything but identity, address and credentials.
    pub fn new(
        id: impl Into<String>,
        http_addr: SocketAddr,
        cert: PathBuf,
        key: PathBuf,
        ca: PathBuf,
        token_key: TokenKey,
    ) -> Self {
        Self {
            id: id.into(),
            http_addr,
            link_ip: None,
            cert,
            key,
            ca,
            token_key,
            strategy: Strategy::RoundRobin,
            token_ttl: Duration::from_secs(600),
            pending_lease: Duration::from_secs(30),
            route_lease: Duration::from_secs(30),
            max_body_bytes: cim_proto::DEFAULT_MAX_BODY_BYTES,
            inbox: store::InboxLimits::default(),
            password_cost: password::Cost::default(),
            login_limits: LoginLimits::default(),
            api_limits: ApiLimits::default(),
            http_request_timeout: Self::DEFAULT_HTTP_REQUEST_TIMEOUT,
            max_group_size: 10_000,
            max_groups_per_user: 1_000,
            id_node_lease: Duration::from_secs(30),
            metrics: Arc::new(cim_core::metrics::RouterMetrics::unregistered()),
            registry: None,
            admin_token: None,
        }
    }
}

/// Why a router could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Certificates or keys could not be loaded.
    #[error("tls: {0}")]
    Tls(#[from] tls::TlsError),
    /// The QUIC endpoint could not be created.
    #[error("endpoint: {0}")]
    Endpoint(#[from] transport::EndpointError),
    /// The HTTPS port could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// Address requested.
        addr: SocketAddr,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The router could not be announced.
    #[error("discovery: {0}")]
    Discovery(#[from] cim_core::discovery::DiscoveryError),
}

/// A router whose sockets are bound but which is not yet serving.
pub struct Router {
    config: Arc<RouterConfig>,
    listener: tokio::net::TcpListener,
    http_tls: Arc<rustls::ServerConfig>,
    endpoint: quinn::Endpoint,
}

impl Router {
    /// Binds the HTTPS listener and the QUIC endpoint used to reach servers.
    pub async fn bind(config: RouterConfig) -> Result<Self, StartError> {
        let mut http_tls = tls::server_config(&config.cert, &config.key, &[], None)?;
        http_tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        // Every API call is a connection of its own, so a client's next call (and its token
        // re-login after a failover) resumes from a ticket: no certificate chain for the
        // client to verify and no signature for the router to make. Stateless tickets (keys
        // rotated every 6 hours) cost the router no memory per client, unlike rustls's
        // default 256-entry session cache, which a login storm flushes. One ticket per
        // connection: a client makes its calls one at a time.
        http_tls.ticketer = rustls::crypto::ring::Ticketer::new().map_err(tls::TlsError::from)?;
        http_tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        http_tls.send_tls13_tickets = 1;
        let link_tls = tls::client_config(
            tls::load_roots(&config.ca)?,
            &[ALPN_INTERNAL],
            Some((&config.cert, &config.key)),
        )?;
        let link_ip = config.link_ip.unwrap_or(if config.http_addr.is_ipv4() {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        } else {
            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        });
        let endpoint = transport::client_endpoint(
            SocketAddr::new(link_ip, 0),
            transport::client_config(link_tls, Link::Internal)?,
        )?;
        let listener = tokio::net::TcpListener::bind(config.http_addr)
            .await
            .map_err(|source| StartError::Bind {
                addr: config.http_addr,
                source,
            })?;
        Ok(Self {
            config: Arc::new(config),
            listener,
            http_tls: Arc::new(http_tls),
            endpoint,
        })
    }

    /// Bound HTTPS address.
    pub fn http_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or(self.config.http_addr)
    }

    /// Serves until `shutdown` is cancelled.
    pub async fn run(
        self,
        store: Arc<dyn store::Store>,
        discovery: Arc<dyn Discovery>,
        shutdown: CancellationToken,
    ) -> Result<(), StartError> {
        let http_addr = self.http_addr();
        let links = Arc::new(links::ServerLinks::new(self.endpoint.clone()));
        let service = Arc::new(service::Service::new(
            self.config.clone(),
            store.clone(),
            discovery.servers(),
            links,
        ));
        let ids = ids::NodeHolder::new(
            service.ids.clone(),
            store.clone(),
            &self.config.id,
            self.config.id_node_lease,
        );
        // Claimed before serving, so the first messages get ids; kept (or claimed, if the
        // store is not reachable yet) in the background.
        let node = ids.claim().await;
        // Stopped after the HTTPS server has drained, so sends in flight still get ids.
        let stop_ids = CancellationToken::new();
        let holding = tokio::spawn(ids.keep(node, stop_ids.clone()));
        let registered = discovery
            .register_router(RouterInfo {
                id: self.config.id.clone(),
                http_addr,
            })
            .await;
        if let Err(e) = registered {
            stop_ids.cancel();
            let _ = holding.await;
            return Err(e.into());
        }
        tracing::info!(id = %self.config.id, %http_addr, "router started");
        let maintain = tokio::spawn(links::maintain(service.clone(), shutdown.clone()));
        let announcing = tokio::spawn(presence::run(service.clone(), shutdown.clone()));
        https::serve(
            self.listener,
            self.http_tls,
            api::routes(service),
            self.config.http_request_timeout,
            self.config.metrics.clone(),
            shutdown.clone(),
        )
        .await;
        let _ = maintain.await;
        let _ = announcing.await;
        stop_ids.cancel();
        let _ = holding.await;
        self.endpoint.close(
            cim_core::close::code(cim_core::close::NORMAL),
            b"router stopped",
        );
        Ok(())
    }
}
