//! In-process discovery for the embedded mode and tests: a shared pair of watch channels.

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::watch;

use super::{Discovery, DiscoveryError, RouterInfo, ServerInfo};

/// Discovery inside one process. Clone it to share the same view.
#[derive(Clone)]
pub struct MemoryDiscovery {
    servers: Arc<watch::Sender<Arc<Vec<ServerInfo>>>>,
    routers: Arc<watch::Sender<Arc<Vec<RouterInfo>>>>,
}

impl Default for MemoryDiscovery {
    fn default() -> Self {
        Self {
            servers: Arc::new(watch::channel(Arc::new(Vec::new())).0),
            routers: Arc::new(watch::channel(Arc::new(Vec::new())).0),
        }
    }
}

impl MemoryDiscovery {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn edit_servers(&self, edit: impl FnOnce(&mut Vec<ServerInfo>)) {
        self.servers.send_modify(|current| {
            let mut next = current.as_ref().clone();
            edit(&mut next);
            next.sort_by(|a, b| a.id.cmp(&b.id));
            *current = Arc::new(next);
        });
    }
}

#[async_trait]
impl Discovery for MemoryDiscovery {
    async fn register_server(&self, info: ServerInfo) -> Result<(), DiscoveryError> {
        self.edit_servers(|list| {
            list.retain(|s| s.id != info.id);
            list.push(info);
        });
        Ok(())
    }

    async fn update_server_load(&self, id: &str, load: u32) -> Result<(), DiscoveryError> {
        self.edit_servers(|list| {
            if let Some(s) = list.iter_mut().find(|s| s.id == id) {
                s.load = load;
            }
        });
        Ok(())
    }

    async fn deregister_server(&self, id: &str) -> Result<(), DiscoveryError> {
        self.edit_servers(|list| list.retain(|s| s.id != id));
        Ok(())
    }

    async fn register_router(&self, info: RouterInfo) -> Result<(), DiscoveryError> {
        self.routers.send_modify(|current| {
            let mut next = current.as_ref().clone();
            next.retain(|r| r.id != info.id);
            next.push(info);
            next.sort_by(|a, b| a.id.cmp(&b.id));
            *current = Arc::new(next);
        });
        Ok(())
    }

    fn servers(&self) -> watch::Receiver<Arc<Vec<ServerInfo>>> {
        self.servers.subscribe()
    }

    fn routers(&self) -> watch::Receiver<Arc<Vec<RouterInfo>>> {
        self.routers.subscribe()
    }
}
