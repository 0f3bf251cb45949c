//! ZooKeeper discovery (zookeeper-async). Servers and routers register ephemeral nodes under
//! `<root>/servers/<id>` and `<root>/routers/<id>` (root `/cim` by default); every process
//! watches both folders.
//!
//! zookeeper-async reconnects by itself after a connection loss, and after a session expiry it
//! silently opens a new session: ephemeral nodes and one-shot watches of the old session are
//! gone. So registration is a reconcile loop (each registered node is checked every second and
//! whenever the connection state changes, and re-created when missing), and each folder's view
//! is refreshed on every watch event plus a periodic re-read as a safety net for lost watches.
//!
//! Node data is UTF-8 `key=value` lines: servers `client=<addr>`, `internal=<addr>`,
//! `load=<n>`, `incarnation=<n>`; routers `http=<addr>`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;
use zookeeper_async::{Acl, CreateMode, WatchedEvent, ZkError, ZkState, ZooKeeper, ZooKeeperExt};

use super::{Discovery, DiscoveryError, RouterInfo, ServerInfo};

/// Default root of cim's nodes.
pub const DEFAULT_ROOT: &str = "/cim";
/// How often registrations are checked and folders re-read without a watch event.
const RECONCILE_EVERY: Duration = Duration::from_secs(1);
/// Longest wait for ZooKeeper on the way out (deregistering, closing): a process whose
/// ZooKeeper is gone must still stop. Its ephemeral nodes go with its session anyway.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(3);

fn unavailable(e: ZkError) -> DiscoveryError {
    DiscoveryError::Unavailable(format!("zookeeper: {e:?}"))
}

#[derive(Default)]
struct Registrations {
    /// Desired node data by path.
    desired: HashMap<String, Vec<u8>>,
    /// Paths whose leftover node (from an earlier process with the same id) was cleared.
    claimed: std::collections::HashSet<String>,
}

/// Discovery on a ZooKeeper ensemble.
pub struct ZkDiscovery {
    zk: Arc<ZooKeeper>,
    registrations: Arc<Mutex<Registrations>>,
    wake: Arc<Notify>,
    servers_path: String,
    routers_path: String,
    servers: watch::Sender<Arc<Vec<ServerInfo>>>,
    routers: watch::Sender<Arc<Vec<RouterInfo>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for ZkDiscovery {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl ZkDiscovery {
    /// How long a starting router or server waits for ZooKeeper to become reachable (the
    /// `patience` of [`ZkDiscovery::connect_patiently`] in both binaries).
    pub const START_PATIENCE: Duration = Duration::from_secs(30);

    /// [`ZkDiscovery::connect`], retried for up to `patience` while ZooKeeper is unreachable
    /// or still starting (a process started alongside its ZooKeeper should not exit).
    pub async fn connect_patiently(
        hosts: &str,
        root: &str,
        session_timeout: Duration,
        patience: Duration,
    ) -> Result<Arc<Self>, DiscoveryError> {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            match Self::connect(hosts, root, session_timeout).await {
                Err(DiscoveryError::Unavailable(e)) if tokio::time::Instant::now() < deadline => {
                    tracing::warn!(hosts, error = %e, "zookeeper not ready; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                result => return result,
            }
        }
    }

    /// Connects to `hosts` (`h1:2181,h2:2181`) with the given session timeout (at least 2 s)
    /// and starts watching the folders under `root` (e.g. [`DEFAULT_ROOT`]). Fails if no host
    /// answers within `session_timeout`.
    pub async fn connect(
        hosts: &str,
        root: &str,
        session_timeout: Duration,
    ) -> Result<Arc<Self>, DiscoveryError> {
        if !root.starts_with('/') || root.ends_with('/') {
            return Err(DiscoveryError::Malformed(format!(
                "zookeeper root {root:?} must start and not end with '/'"
            )));
        }
        let servers_path = format!("{root}/servers");
        let routers_path = format!("{root}/routers");
        let session_timeout = session_timeout.max(Duration::from_secs(2));
        let connecting = ZooKeeper::connect_with_retry_time(
            hosts,
            session_timeout,
            |_event: WatchedEvent| {},
            Duration::from_millis(500),
        );
        let zk = tokio::time::timeout(session_timeout, connecting)
            .await
            .map_err(|_| DiscoveryError::Unavailable(format!("no zookeeper reachable at {hosts}")))?
            .map_err(unavailable)?;
        let zk = Arc::new(zk);
        // The connection is open but the session may not be: the first real request waits.
        let folders = async {
            tokio::time::timeout(session_timeout, zk.ensure_path(&servers_path))
                .await
                .map_err(|_| {
                    DiscoveryError::Unavailable("zookeeper session not established".into())
                })?
                .map_err(unavailable)?;
            zk.ensure_path(&routers_path).await.map_err(unavailable)
        };
        if let Err(e) = folders.await {
            // Ends the session at once if it came up late (dropping the client only stops its
            // task: the session would wait out its timeout).
            let _ = tokio::time::timeout(SHUTDOWN_TIMEOUT, zk.close()).await;
            return Err(e);
        }

        let wake = Arc::new(Notify::new());
        let listener_wake = wake.clone();
        let state_changes = Arc::new(AtomicU64::new(0));
        let listener_state_changes = state_changes.clone();
        zk.add_listener(move |state: ZkState| {
            tracing::info!(?state, "zookeeper state changed");
            listener_state_changes.fetch_add(1, Ordering::Relaxed);
            listener_wake.notify_waiters();
        });
        let registrations = Arc::new(Mutex::new(Registrations::default()));
        let (servers, _) = watch::channel(Arc::new(Vec::new()));
        let (routers, _) = watch::channel(Arc::new(Vec::new()));
        let tasks = vec![
            tokio::spawn(reconcile(zk.clone(), registrations.clone(), wake.clone())),
            tokio::spawn(watch_folder(
                zk.clone(),
                servers_path.clone(),
                wake.clone(),
                state_changes.clone(),
                {
                    let servers = servers.clone();
                    move |nodes| {
                        publish(
                            &servers,
                            nodes
                                .iter()
                                .filter_map(|(id, d)| parse_server(id, d))
                                .collect(),
                        )
                    }
                },
            )),
            tokio::spawn(watch_folder(
                zk.clone(),
                routers_path.clone(),
                wake.clone(),
                state_changes.clone(),
                {
                    let routers = routers.clone();
                    move |nodes| {
                        publish(
                            &routers,
                            nodes
                                .iter()
                                .filter_map(|(id, d)| parse_router(id, d))
                                .collect(),
                        )
                    }
                },
            )),
        ];
        Ok(Arc::new(Self {
            zk,
            registrations,
            wake,
            servers_path,
            routers_path,
            servers,
            routers,
            tasks,
        }))
    }

    fn set_desired(&self, path: String, data: Vec<u8>) {
        self.registrations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .desired
            .insert(path, data);
        self.wake.notify_waiters();
    }

    /// Writes one registration now, so callers learn about failures at once.
    async fn write_now(&self, path: &str) -> Result<(), DiscoveryError> {
        ensure_registered(&self.zk, &self.registrations, path).await
    }

    /// Ends the ZooKeeper session (its ephemeral nodes vanish at once).
    pub async fn close(&self) {
        let _ = tokio::time::timeout(SHUTDOWN_TIMEOUT, self.zk.close()).await;
    }
}

fn publish<T: PartialEq>(sender: &watch::Sender<Arc<Vec<T>>>, list: Vec<T>) {
    sender.send_if_modified(|current| {
        if current.as_ref() == &list {
            return false;
        }
        *current = Arc::new(list);
        true
    });
}

fn server_node(info: &ServerInfo) -> Vec<u8> {
    format!(
        "client={}\ninternal={}\nload={}\nincarnation={}\n",
        info.client_addr, info.internal_addr, info.load, info.incarnation
    )
    .into_bytes()
}

fn fields(data: &[u8]) -> HashMap<&str, &str> {
    std::str::from_utf8(data)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('='))
        .collect()
}

fn parse_server(id: &str, data: &[u8]) -> Option<ServerInfo> {
    let f = fields(data);
    let parsed = ServerInfo {
        id: id.to_string(),
        client_addr: f.get("client")?.parse().ok()?,
        internal_addr: f.get("internal")?.parse().ok()?,
        load: f.get("load").and_then(|l| l.parse().ok()).unwrap_or(0),
        incarnation: f
            .get("incarnation")
            .and_then(|i| i.parse().ok())
            .unwrap_or(0),
    };
    Some(parsed)
}

fn parse_router(id: &str, data: &[u8]) -> Option<RouterInfo> {
    let http: SocketAddr = fields(data).get("http")?.parse().ok()?;
    Some(RouterInfo {
        id: id.to_string(),
        http_addr: http,
    })
}

/// Makes the node at `path` exist with the desired data.
async fn ensure_registered(
    zk: &ZooKeeper,
    registrations: &Mutex<Registrations>,
    path: &str,
) -> Result<(), DiscoveryError> {
    let (desired, claimed) = {
        let regs = registrations.lock().unwrap_or_else(|p| p.into_inner());
        match regs.desired.get(path) {
            Some(d) => (d.clone(), regs.claimed.contains(path)),
            None => return Ok(()),
        }
    };
    if !claimed {
        // A node left by an earlier process with our id lingers until its session times out;
        // replace it so it cannot vanish under us later.
        match zk.delete(path, None).await {
            Ok(()) | Err(ZkError::NoNode) => {}
            Err(e) => return Err(unavailable(e)),
        }
        registrations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .claimed
            .insert(path.to_string());
    }
    match zk.get_data(path, false).await {
        Ok((data, _)) if data == desired => Ok(()),
        Ok(_) => zk
            .set_data(path, desired, None)
            .await
            .map(|_| ())
            .map_err(unavailable),
        Err(ZkError::NoNode) => {
            if let Some(parent) = path.rsplit_once('/').map(|(p, _)| p) {
                zk.ensure_path(parent).await.map_err(unavailable)?;
            }
            match zk
                .create(
                    path,
                    desired,
                    Acl::open_unsafe().clone(),
                    CreateMode::Ephemeral,
                )
                .await
            {
                Ok(_) => {
                    tracing::info!(path, "registered in zookeeper");
                    Ok(())
                }
                Err(ZkError::NodeExists) => Ok(()),
                Err(e) => Err(unavailable(e)),
            }
        }
        Err(e) => Err(unavailable(e)),
    }
}

/// Keeps every registration present, including after a session expiry.
async fn reconcile(
    zk: Arc<ZooKeeper>,
    registrations: Arc<Mutex<Registrations>>,
    wake: Arc<Notify>,
) {
    loop {
        let paths: Vec<String> = registrations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .desired
            .keys()
            .cloned()
            .collect();
        for path in paths {
            if let Err(e) = ensure_registered(&zk, &registrations, &path).await {
                tracing::debug!(path, error = %e, "registration check failed");
            }
        }
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(RECONCILE_EVERY) => {}
        }
    }
}

/// Reads a folder's children and their data on every change, publishing through `publish`.
async fn watch_folder(
    zk: Arc<ZooKeeper>,
    path: String,
    wake: Arc<Notify>,
    state_changes: Arc<AtomicU64>,
    publish: impl Fn(Vec<(String, Vec<u8>)>) + Send + 'static,
) {
    let (changed_tx, mut changed) = mpsc::channel::<()>(1);
    // A watch is set only while none is pending: zookeeper-async keeps each one's callback
    // until its event comes, so setting one on every pass (every second and every wake) grew
    // that table without end in a cluster whose membership stood still. A state change (a
    // reconnect, a new session after an expiry) may have lost the pending one: set another.
    let mut armed_in_state = None;
    loop {
        let state = state_changes.load(Ordering::Relaxed);
        let listed = if armed_in_state == Some(state) {
            zk.get_children(&path, false).await
        } else {
            let tx = changed_tx.clone();
            let listed = zk
                .get_children_w(&path, move |_event: WatchedEvent| {
                    let _ = tx.try_send(());
                })
                .await;
            armed_in_state = listed.is_ok().then_some(state);
            listed
        };
        match listed {
            Ok(children) => {
                let mut nodes = Vec::with_capacity(children.len());
                let mut complete = true;
                for child in children {
                    match zk.get_data(&format!("{path}/{child}"), false).await {
                        Ok((data, _)) => nodes.push((child, data)),
                        Err(ZkError::NoNode) => {}
                        Err(_) => complete = false,
                    }
                }
                // A partial read during a connection blip must not make nodes look gone.
                if complete {
                    nodes.sort_by(|a, b| a.0.cmp(&b.0));
                    publish(nodes);
                }
            }
            Err(ZkError::NoNode) => {
                let _ = zk.ensure_path(&path).await;
            }
            Err(e) => tracing::debug!(%path, error = ?e, "listing failed"),
        }
        tokio::select! {
            _ = changed.recv() => armed_in_state = None,
            _ = wake.notified() => {}
            _ = tokio::time::sleep(RECONCILE_EVERY) => {}
        }
    }
}

#[async_trait]
impl Discovery for ZkDiscovery {
    async fn register_server(&self, info: ServerInfo) -> Result<(), DiscoveryError> {
        let path = format!("{}/{}", self.servers_path, info.id);
        self.set_desired(path.clone(), server_node(&info));
        self.write_now(&path).await
    }

    async fn update_server_load(&self, id: &str, load: u32) -> Result<(), DiscoveryError> {
        let path = format!("{}/{id}", self.servers_path);
        let data = {
            let regs = self.registrations.lock().unwrap_or_else(|p| p.into_inner());
            let Some(current) = regs.desired.get(&path) else {
                return Ok(());
            };
            let Some(mut info) = parse_server(id, current) else {
                return Ok(());
            };
            info.load = load;
            server_node(&info)
        };
        self.set_desired(path, data);
        Ok(())
    }

    async fn deregister_server(&self, id: &str) -> Result<(), DiscoveryError> {
        let path = format!("{}/{id}", self.servers_path);
        self.registrations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .desired
            .remove(&path);
        match tokio::time::timeout(SHUTDOWN_TIMEOUT, self.zk.delete(&path, None)).await {
            Ok(Ok(()) | Err(ZkError::NoNode)) => Ok(()),
            Ok(Err(e)) => Err(unavailable(e)),
            Err(_) => Err(DiscoveryError::Unavailable(format!(
                "zookeeper did not answer within {SHUTDOWN_TIMEOUT:?}"
            ))),
        }
    }

    async fn register_router(&self, info: RouterInfo) -> Result<(), DiscoveryError> {
        let path = format!("{}/{}", self.routers_path, info.id);
        self.set_desired(
            path.clone(),
            format!("http={}\n", info.http_addr).into_bytes(),
        );
        self.write_now(&path).await
    }

    fn servers(&self) -> watch::Receiver<Arc<Vec<ServerInfo>>> {
        self.servers.subscribe()
    }

    fn routers(&self) -> watch::Receiver<Arc<Vec<RouterInfo>>> {
        self.routers.subscribe()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn server_nodes_round_trip_and_garbage_is_skipped() {
        let info = ServerInfo {
            id: "s1".into(),
            client_addr: "127.0.0.1:1000".parse().unwrap(),
            internal_addr: "[::1]:2000".parse().unwrap(),
            load: 12,
            incarnation: u64::MAX,
        };
        assert_eq!(parse_server("s1", &server_node(&info)), Some(info));
        assert_eq!(parse_server("s1", b"\xff\xfe garbage"), None);
        assert_eq!(parse_server("s1", b"client=nope\ninternal=1.2.3.4:5"), None);
    }

    /// A loopback listener that accepts connections and closes each at once (a ZooKeeper
    /// without quorum, or starting), and the number it accepted so far.
    async fn accept_and_close() -> (String, Arc<AtomicU64>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let accepted = Arc::new(AtomicU64::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::Relaxed);
                drop(socket);
            }
        });
        (addr, accepted)
    }

    /// A ZooKeeper that accepts connections and closes them is retried at a bounded pace (the
    /// library reconnected at once, spinning a core), and a start that gave up on it leaves no
    /// client behind reconnecting for the rest of the process.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_zookeeper_that_hangs_up_is_not_redialed_in_a_loop() {
        let (addr, accepted) = accept_and_close().await;
        let started = tokio::time::Instant::now();
        let connected = ZkDiscovery::connect_patiently(
            &addr,
            DEFAULT_ROOT,
            Duration::from_secs(2),
            Duration::from_secs(3),
        )
        .await;
        assert!(connected.is_err(), "no session can come up");
        let elapsed = started.elapsed().as_secs_f64();
        let while_trying = accepted.load(Ordering::Relaxed);
        // At most one attempt per 500 ms retry time, for each client made (one per try).
        assert!(
            (while_trying as f64) < elapsed * 2.0 * 2.0 + 4.0,
            "{while_trying} connections in {elapsed:.1} s"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = accepted.load(Ordering::Relaxed) - while_trying;
        assert!(after <= 1, "{after} connections after giving up");
    }

    /// A client dropped without `close` (whose request would be lost to the hang-ups anyway)
    /// stops dialing: the library's task went on for the rest of the process.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_zookeeper_client_stops_dialing() {
        let (addr, accepted) = accept_and_close().await;
        let retry = Duration::from_millis(100);
        let started = tokio::time::Instant::now();
        let zk = ZooKeeper::connect_with_retry_time(&addr, Duration::from_secs(2), |_| {}, retry)
            .await
            .unwrap();
        // It redials, once per retry time at most.
        while accepted.load(Ordering::Relaxed) < 2 {
            assert!(started.elapsed() < Duration::from_secs(5), "no redial");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let dialing = accepted.load(Ordering::Relaxed);
        let most = started.elapsed().as_millis() / retry.as_millis() + 2;
        assert!(
            dialing as u128 <= most,
            "{dialing} dials, at most {most} due"
        );
        drop(zk);
        // Dropped, it stops: a dial may still be on its way, but then half a second (five
        // retry times) passes without one.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let before = accepted.load(Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(500)).await;
            let after = accepted.load(Ordering::Relaxed);
            if after == before {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "still dialing 5 s after the client was dropped ({after} dials)"
            );
        }
    }
}
