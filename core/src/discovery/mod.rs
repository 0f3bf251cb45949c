//! Discovery: the live set of servers and routers. Servers and routers register themselves;
//! everyone watches the sets. The in-process [`MemoryDiscovery`] serves the embedded mode and
//! unit tests; the ZooKeeper implementation serves clusters.

use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::watch;

mod memory;
mod zookeeper;

pub use memory::MemoryDiscovery;
pub use zookeeper::{DEFAULT_ROOT, ZkDiscovery};

/// A server as seen through discovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerInfo {
    /// Unique server id (also the name tokens are bound to).
    pub id: String,
    /// Address clients connect to over QUIC.
    pub client_addr: SocketAddr,
    /// Address routers connect to over QUIC (mutual TLS).
    pub internal_addr: SocketAddr,
    /// Connected clients, as last reported.
    pub load: u32,
    /// Random per server process (0 from one that does not say): a server id back with
    /// another is a new process, without the old one's sessions, even at the same address.
    pub incarnation: u64,
}

/// A router as seen through discovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterInfo {
    /// Unique router id.
    pub id: String,
    /// HTTPS address of its API.
    pub http_addr: SocketAddr,
}

/// Why a discovery operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The coordination service could not be reached or refused the operation.
    #[error("discovery backend unavailable: {0}")]
    Unavailable(String),
    /// Stored data could not be understood.
    #[error("malformed discovery entry: {0}")]
    Malformed(String),
}

/// Live membership of servers and routers.
#[async_trait]
pub trait Discovery: Send + Sync + 'static {
    /// Announces a server. The registration lives until [`Discovery::deregister_server`] or the
    /// process ends, and is restored by the implementation if its backend session is lost.
    async fn register_server(&self, info: ServerInfo) -> Result<(), DiscoveryError>;
    /// Updates the load a registered server reports.
    async fn update_server_load(&self, id: &str, load: u32) -> Result<(), DiscoveryError>;
    /// Withdraws a server (graceful shutdown).
    async fn deregister_server(&self, id: &str) -> Result<(), DiscoveryError>;
    /// Announces a router.
    async fn register_router(&self, info: RouterInfo) -> Result<(), DiscoveryError>;
    /// Live servers, sorted by id, kept current.
    fn servers(&self) -> watch::Receiver<Arc<Vec<ServerInfo>>>;
    /// Live routers, sorted by id, kept current.
    fn routers(&self) -> watch::Receiver<Arc<Vec<RouterInfo>>>;
}
