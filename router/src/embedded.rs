//! The embedded mode: one router and a few servers in one process, on the in-memory store and
//! in-process discovery, with dev certificates created on first run. Nothing to install.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cim_core::discovery::{Discovery, MemoryDiscovery};
use cim_core::metrics::{self, Registry, RouterMetrics, ServerMetrics};
use cim_core::token::TokenKey;
use cim_server::{Server, ServerConfig};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::store::{MemoryStore, Store};
use crate::{Router, RouterConfig, Strategy};

/// Settings of an embedded cluster.
#[derive(Debug, Clone)]
pub struct EmbeddedConfig {
    /// Router HTTPS address.
    pub http_addr: SocketAddr,
    /// Directory holding (or receiving) the dev certificates.
    pub certs_dir: PathBuf,
    /// Number of servers.
    pub servers: usize,
    /// Address servers bind their client and internal endpoints to (ports are picked freely).
    pub server_ip: IpAddr,
    /// Route selection strategy.
    pub strategy: Strategy,
    /// Interval at which clients ping.
    pub heartbeat_interval: Duration,
    /// Dead-peer timeout on servers.
    pub heartbeat_timeout: Duration,
    /// How often servers renew their sessions' routes.
    pub renew_interval: Duration,
    /// Argon2id cost of new password hashes.
    pub password_cost: crate::password::Cost,
    /// Login attempt limits of the router.
    pub login_limits: crate::LoginLimits,
    /// Limits on registrations and other API requests.
    pub api_limits: crate::ApiLimits,
    /// Caps on the servers' clients.
    pub server_limits: cim_server::Limits,
    /// Most members a group may have.
    pub max_group_size: usize,
    /// Most groups a user may be in.
    pub max_groups_per_user: usize,
    /// Admin page credential (`None`: a random one is made).
    pub admin_token: Option<String>,
    /// Caps on each user's inbox.
    pub inbox: crate::store::InboxLimits,
    /// Lifetime of session tokens (router logins and the servers' renewals).
    pub token_ttl: Duration,
    /// See [`RouterConfig::http_request_timeout`].
    pub http_request_timeout: Duration,
}

/// A running embedded cluster.
pub struct Embedded {
    /// Router HTTPS URL, e.g. `https://127.0.0.1:8443`.
    pub router_url: String,
    /// The admin page, with its token.
    pub admin_url: String,
    /// CA certificate clients must trust.
    pub ca: PathBuf,
    /// `(id, client address)` of each server.
    pub servers: Vec<(String, SocketAddr)>,
    /// Internal (router-facing) address of each server, in the same order.
    pub internal_addrs: Vec<SocketAddr>,
    /// Whether the certificates were created by this start.
    pub certs_created: bool,
    /// The store the router uses.
    pub store: Arc<dyn Store>,
    /// The in-process discovery the router and servers share.
    pub discovery: Arc<dyn Discovery>,
    tasks: JoinSet<()>,
}

impl Embedded {
    /// Waits until every component has stopped (after `shutdown` is cancelled).
    pub async fn wait(mut self) {
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Starts a router and `config.servers` servers on an in-memory store; they run until
/// `shutdown` is cancelled.
pub async fn start(
    config: EmbeddedConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<Embedded> {
    start_with_store(config, Arc::new(MemoryStore::new()), shutdown).await
}

/// [`start`] on a given store (tests run the same cluster on Redis).
pub async fn start_with_store(
    config: EmbeddedConfig,
    store: Arc<dyn Store>,
    shutdown: CancellationToken,
) -> anyhow::Result<Embedded> {
    use anyhow::Context;
    // The addresses clients are given must be in the certificates (the loopback ones are).
    let mut hosts: Vec<String> = [config.server_ip, config.http_addr.ip()]
        .iter()
        .filter(|ip| !ip.is_unspecified() && !ip.is_loopback())
        .map(ToString::to_string)
        .collect();
    hosts.dedup();
    let (certs, certs_created) = cim_certs::ensure(&config.certs_dir, &hosts)
        .with_context(|| format!("preparing certificates in {}", config.certs_dir.display()))?;
    let secret = std::fs::read_to_string(certs.token_secret())
        .with_context(|| format!("reading {}", certs.token_secret().display()))?;
    let token_key = TokenKey::from_hex(&secret).context("token secret")?;
    let discovery: Arc<dyn Discovery> = Arc::new(MemoryDiscovery::new());
    // One registry for the whole process: servers under a `server` label.
    let mut registry = Registry::default();
    let mut tasks = JoinSet::new();

    let mut servers = Vec::new();
    let mut internal_addrs = Vec::new();
    for i in 1..=config.servers {
        let mut server_config = ServerConfig::new(
            format!("server-{i}"),
            SocketAddr::new(config.server_ip, 0),
            SocketAddr::new(config.server_ip, 0),
            certs.server_cert(),
            certs.server_key(),
            certs.ca_cert(),
            token_key.clone(),
        );
        server_config.heartbeat_interval = config.heartbeat_interval;
        server_config.heartbeat_timeout = config.heartbeat_timeout;
        server_config.renew_interval = config.renew_interval;
        server_config.limits = config.server_limits;
        server_config.token_ttl = config.token_ttl;
        server_config.metrics =
            ServerMetrics::new(metrics::labelled(&mut registry, &format!("server-{i}")));
        let server = Server::bind(server_config).context("starting server")?;
        servers.push((server.id().to_string(), server.client_addr()));
        internal_addrs.push(server.internal_addr());
        let discovery = discovery.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            if let Err(e) = server.run(discovery, shutdown).await {
                tracing::error!(error = %e, "server failed");
            }
        });
    }

    let mut router_config = RouterConfig::new(
        "router-1",
        config.http_addr,
        certs.router_cert(),
        certs.router_key(),
        certs.ca_cert(),
        token_key,
    );
    // The servers are in this process, at this address: the links need no other.
    router_config.link_ip = Some(config.server_ip);
    router_config.strategy = config.strategy;
    router_config.password_cost = config.password_cost;
    router_config.login_limits = config.login_limits;
    router_config.api_limits = config.api_limits;
    router_config.max_group_size = config.max_group_size;
    router_config.max_groups_per_user = config.max_groups_per_user;
    router_config.inbox = config.inbox;
    router_config.token_ttl = config.token_ttl;
    router_config.http_request_timeout = config.http_request_timeout;
    let admin_token = config.admin_token.clone().unwrap_or_else(|| {
        (0..4)
            .map(|_| format!("{:08x}", rand::random::<u32>()))
            .collect()
    });
    router_config.admin_token = Some(admin_token.clone());
    router_config.metrics = RouterMetrics::new(&mut registry);
    router_config.registry = Some(Arc::new(registry));
    let router = Router::bind(router_config)
        .await
        .context("starting router")?;
    let router_url = format!("https://{}", router.http_addr());
    let admin_url = format!("{router_url}/admin?token={admin_token}");
    let router_store = store.clone();
    let router_discovery = discovery.clone();
    tasks.spawn(async move {
        if let Err(e) = router.run(router_store, router_discovery, shutdown).await {
            tracing::error!(error = %e, "router failed");
        }
    });
    Ok(Embedded {
        router_url,
        admin_url,
        ca: certs.ca_cert(),
        servers,
        internal_addrs,
        certs_created,
        store,
        discovery,
        tasks,
    })
}
