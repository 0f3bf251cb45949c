//! A real cluster made of processes: a private Redis per test (killable and restartable on
//! the same port and data directory), the ZooKeeper that `test.sh` starts (each test under its
//! own root folder), and `cim-router` / `cim-server` processes.

use std::net::TcpListener;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use cim_client::{ClientConfig, RouterApi};
use tokio::process::{Child, Command};

use crate::{Proc, WAIT, eventually, init_logs};

/// A port free on 127.0.0.1 right now.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// ZooKeeper hosts from `CIM_TEST_ZOOKEEPER` (set by `test.sh`).
pub fn zookeeper_hosts() -> anyhow::Result<String> {
    std::env::var("CIM_TEST_ZOOKEEPER").context(
        "CIM_TEST_ZOOKEEPER is not set: run the suite through ./test.sh, which starts ZooKeeper",
    )
}

/// A redis-server process with append-only persistence in a private directory.
pub struct RedisProc {
    child: Option<Child>,
    /// Port it listens on (kept across restarts).
    pub port: u16,
    dir: tempfile::TempDir,
}

impl RedisProc {
    /// Starts Redis on a free port.
    pub async fn start() -> anyhow::Result<Self> {
        let mut redis = Self {
            child: None,
            port: free_port()?,
            dir: tempfile::tempdir()?,
        };
        redis.spawn().await?;
        Ok(redis)
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let bin = std::env::var("CIM_TEST_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let child = Command::new(&bin)
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawning {bin} (run ./test.sh to install it)"))?;
        self.child = Some(child);
        let url = self.url();
        eventually(WAIT, || async {
            let client = redis::Client::open(url.as_str()).ok()?;
            let mut conn = client.get_multiplexed_async_connection().await.ok()?;
            redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .ok()
        })
        .await
        .context("redis did not start")?;
        Ok(())
    }

    /// Kills Redis (SIGKILL).
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.start_kill()?;
            child.wait().await?;
        }
        Ok(())
    }

    /// Starts Redis again on the same port and data.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.spawn().await
    }

    /// A connection for inspecting keys.
    pub async fn conn(&self) -> anyhow::Result<redis::aio::MultiplexedConnection> {
        Ok(redis::Client::open(self.url())?
            .get_multiplexed_async_connection()
            .await?)
    }
}

/// Timings used by process clusters: short so failures show quickly.
pub const HEARTBEAT_MS: u64 = 300;
/// Servers drop silent clients after this.
pub const HEARTBEAT_TIMEOUT_MS: u64 = 2000;
/// ZooKeeper session timeout of every process.
pub const ZK_SESSION_MS: u64 = 3000;
/// Route lease on routers.
pub const ROUTE_LEASE_MS: u64 = 4000;
/// Route renewal interval on servers.
pub const RENEW_MS: u64 = 1000;
/// Routers' lease on their message-id node (renewed every sixth of it).
pub const ID_NODE_LEASE_MS: u64 = 3000;

/// Routers and servers as processes, sharing Redis, ZooKeeper (under a private root) and a CA.
pub struct ProcCluster {
    /// Redis of this cluster.
    pub redis: RedisProc,
    /// ZooKeeper root folder of this cluster.
    pub zk_root: String,
    /// Certificates.
    pub certs: tempfile::TempDir,
    /// `(url, process)` of each router.
    pub routers: Vec<(String, Proc)>,
    /// `(id, process)` of each server.
    pub servers: Vec<(String, Proc)>,
    strategy: String,
}

impl ProcCluster {
    /// Starts `routers` routers and `servers` servers and waits until every router links to
    /// every server.
    pub async fn start(routers: usize, servers: usize, strategy: &str) -> anyhow::Result<Self> {
        init_logs();
        let redis = RedisProc::start().await?;
        let certs = tempfile::tempdir()?;
        cim_certs::generate(certs.path(), &[])?;
        let mut cluster = Self {
            redis,
            zk_root: format!("/cim-test-{:016x}", rand_u64()),
            certs,
            routers: Vec::new(),
            servers: Vec::new(),
            strategy: strategy.to_string(),
        };
        for i in 1..=servers {
            cluster.add_server(&format!("s{i}")).await?;
        }
        for _ in 0..routers {
            cluster.add_router().await?;
        }
        cluster.wait_servers(servers).await?;
        Ok(cluster)
    }

    fn certs_dir(&self) -> String {
        self.certs.path().to_string_lossy().into_owned()
    }

    /// Starts a server process with id `id`.
    pub async fn add_server(&mut self, id: &str) -> anyhow::Result<()> {
        self.add_server_with(id, &[]).await
    }

    /// Starts a server process with id `id` and `extra` options.
    pub async fn add_server_with(&mut self, id: &str, extra: &[&str]) -> anyhow::Result<()> {
        let zk = zookeeper_hosts()?;
        let certs = self.certs_dir();
        let (zk_session, heartbeat, heartbeat_timeout, renew) = (
            ZK_SESSION_MS.to_string(),
            HEARTBEAT_MS.to_string(),
            HEARTBEAT_TIMEOUT_MS.to_string(),
            RENEW_MS.to_string(),
        );
        let mut args = vec![
            "--id",
            id,
            "--zookeeper",
            &zk,
            "--zk-root",
            &self.zk_root,
            "--zk-session-timeout-ms",
            &zk_session,
            "--listen",
            "127.0.0.1:0",
            "--internal",
            "127.0.0.1:0",
            "--certs",
            &certs,
            "--heartbeat-ms",
            &heartbeat,
            "--heartbeat-timeout-ms",
            &heartbeat_timeout,
            "--renew-ms",
            &renew,
            "--max-connections-per-ip",
            "100000",
            "--max-msgs-per-sec",
            "100000",
        ];
        args.extend_from_slice(extra);
        let mut proc = Proc::spawn("cim-server", &args)?;
        proc.expect_line(&format!("server {id} listening")).await?;
        self.servers.push((id.to_string(), proc));
        Ok(())
    }

    /// Starts a router process.
    pub async fn add_router(&mut self) -> anyhow::Result<()> {
        let zk = zookeeper_hosts()?;
        let certs = self.certs_dir();
        let redis = self.redis.url();
        let id = format!("r{}", self.routers.len() + 1);
        let mut proc = Proc::spawn(
            "cim-router",
            &[
                "--id",
                &id,
                "--http",
                "127.0.0.1:0",
                "--link-ip",
                "127.0.0.1",
                "--redis",
                &redis,
                "--zookeeper",
                &zk,
                "--zk-root",
                &self.zk_root,
                "--zk-session-timeout-ms",
                &ZK_SESSION_MS.to_string(),
                "--route-lease-ms",
                &ROUTE_LEASE_MS.to_string(),
                "--id-node-lease-ms",
                &ID_NODE_LEASE_MS.to_string(),
                "--certs",
                &certs,
                "--strategy",
                &self.strategy,
                "--max-login-attempts-per-ip",
                "100000",
                "--max-registrations-per-ip",
                "100000",
            ],
        )?;
        let line = proc.expect_line(&format!("router {id}: ")).await?;
        let url = line
            .split(": ")
            .nth(1)
            .context("no url in router banner")?
            .trim()
            .to_string();
        self.routers.push((url, proc));
        Ok(())
    }

    /// Client configuration pointing at router `i`.
    pub fn client_config(&self, router: usize) -> ClientConfig {
        let ca = std::fs::read(self.certs.path().join(cim_certs::CA_CERT)).unwrap_or_default();
        let mut config = ClientConfig::new(self.routers[router].0.clone(), ca);
        config.bind_addr = "127.0.0.1:0".parse().unwrap_or(config.bind_addr);
        config
    }

    /// Waits until every router reports `n` linked servers.
    pub async fn wait_servers(&self, n: usize) -> anyhow::Result<()> {
        for i in 0..self.routers.len() {
            let api = RouterApi::new(&self.client_config(i))?;
            eventually(Duration::from_secs(20), || async {
                let health: serde_json::Value = api
                    .call::<(), _>(http::Method::GET, "/health", None, None)
                    .await
                    .ok()?;
                (health["servers"].as_u64() == Some(n as u64)).then_some(())
            })
            .await
            .with_context(|| format!("router {i} never saw {n} servers"))?;
        }
        Ok(())
    }

    /// The process of server `id`.
    pub fn server(&mut self, id: &str) -> anyhow::Result<&mut Proc> {
        match self.servers.iter_mut().find(|(s, _)| s == id) {
            Some((_, p)) => Ok(p),
            None => bail!("no server {id}"),
        }
    }

    /// Stops server `id` with SIGTERM (graceful drain), waits for it to exit, and starts it
    /// again with the same id.
    pub async fn restart_server(&mut self, id: &str) -> anyhow::Result<()> {
        self.signal_server(id, "TERM").await?;
        let proc = self.server(id)?;
        tokio::time::timeout(Duration::from_secs(20), proc.child.wait())
            .await
            .context("server did not exit after SIGTERM")??;
        self.servers.retain(|(s, _)| s != id);
        self.add_server(id).await
    }

    /// Sends `signal` (e.g. "KILL", "STOP", "CONT") to server `id`.
    pub async fn signal_server(&mut self, id: &str, signal: &str) -> anyhow::Result<()> {
        let pid = self
            .server(id)?
            .child
            .id()
            .context("server already exited")?;
        let status = Command::new("kill")
            .args([format!("-{signal}"), pid.to_string()])
            .status()
            .await?;
        if !status.success() {
            bail!("kill -{signal} {pid} failed");
        }
        Ok(())
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}
