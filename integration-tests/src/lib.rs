//! Helpers for cim's black-box tests: start an embedded cluster on `127.0.0.1:0`, find the
//! workspace's binaries, spawn real processes, and wait on events with deadlines (never bare
//! sleeps as synchronisation).

pub mod cluster;
pub use cim_bench::relay;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use cim_client::{Client, ClientConfig, Event, Events, LoginOptions};
use cim_core::transport::{self, Link};
use cim_core::{ALPN_CLIENT, tls};
use cim_proto::v1::{
    ClientControl, Login, LoginResult, ServerControl, client_control, server_control,
};
use cim_proto::{read_required, write_frame};
use cim_router::embedded::{self, Embedded, EmbeddedConfig};
use cim_router::store::{MemoryStore, RedisStore, Store};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};
use tokio_util::sync::CancellationToken;

/// A raw login's connection, its login result and its control stream (send, receive): the
/// session lasts while the connection and the control stream are kept.
pub type RawSession = (
    quinn::Connection,
    LoginResult,
    quinn::SendStream,
    quinn::RecvStream,
);

/// Default wait for something that should happen promptly.
pub const WAIT: Duration = Duration::from_secs(10);

/// Installs a test log subscriber once (respects `RUST_LOG`, silent by default).
pub fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// An embedded cluster (router + servers, memory store) running inside the test process.
pub struct TestCluster {
    /// The running components.
    pub embedded: Embedded,
    /// Stops everything when cancelled (also on drop).
    pub shutdown: CancellationToken,
    /// Certificates live here.
    pub dir: tempfile::TempDir,
    /// The Redis behind the store, for [`Backend::Redis`].
    pub redis: Option<cluster::RedisProc>,
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Which store an in-process cluster runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The in-memory store of the embedded mode.
    Memory,
    /// A real Redis started for the test.
    Redis,
}

impl TestCluster {
    /// Starts a router and `servers` servers with fast heartbeats on the memory store.
    pub async fn start(servers: usize) -> anyhow::Result<Self> {
        Self::start_on(servers, Backend::Memory).await
    }

    /// Starts a router and `servers` servers with fast heartbeats on `backend`.
    pub async fn start_on(servers: usize, backend: Backend) -> anyhow::Result<Self> {
        Self::start_with(servers, backend, |_| {}).await
    }

    /// [`TestCluster::start_on`] with the configuration adjusted by `tweak` first.
    pub async fn start_with(
        servers: usize,
        backend: Backend,
        tweak: impl FnOnce(&mut EmbeddedConfig),
    ) -> anyhow::Result<Self> {
        let (store, redis): (Arc<dyn Store>, _) = match backend {
            Backend::Memory => (Arc::new(MemoryStore::new()), None),
            Backend::Redis => {
                let redis = cluster::RedisProc::start().await?;
                let store = RedisStore::connect(&redis.url()).await?;
                (Arc::new(store), Some(redis))
            }
        };
        let mut cluster = Self::start_on_store(servers, store, tweak).await?;
        cluster.redis = redis;
        Ok(cluster)
    }

    /// [`TestCluster::start_with`] on a store of the test's own (a wrapper that delays or
    /// fails some calls, say).
    pub async fn start_on_store(
        servers: usize,
        store: Arc<dyn Store>,
        tweak: impl FnOnce(&mut EmbeddedConfig),
    ) -> anyhow::Result<Self> {
        init_logs();
        let dir = tempfile::tempdir()?;
        let shutdown = CancellationToken::new();
        let config = EmbeddedConfig {
            http_addr: "127.0.0.1:0".parse()?,
            certs_dir: dir.path().join("certs"),
            servers,
            server_ip: "127.0.0.1".parse()?,
            strategy: cim_router::Strategy::RoundRobin,
            heartbeat_interval: Duration::from_millis(300),
            heartbeat_timeout: Duration::from_secs(2),
            renew_interval: Duration::from_secs(10),
            password_cost: cim_router::password::Cost::default(),
            // Every test client comes from 127.0.0.1 and some send as fast as they can.
            login_limits: cim_router::LoginLimits {
                failures_per_user: 5,
                attempts_per_ip: 100_000,
            },
            api_limits: cim_router::ApiLimits {
                registrations_per_ip: 100_000,
                requests_per_user: 100_000,
            },
            max_group_size: 10_000,
            max_groups_per_user: 1_000,
            admin_token: Some("test-admin-token".into()),
            inbox: cim_router::store::InboxLimits::default(),
            token_ttl: Duration::from_secs(600),
            http_request_timeout: cim_router::RouterConfig::DEFAULT_HTTP_REQUEST_TIMEOUT,
            server_limits: cim_server::Limits {
                max_connections_per_ip: 100_000,
                messages_per_sec: 100_000,
                message_burst: 100_000,
                ..cim_server::Limits::default()
            },
        };
        let mut config = config;
        tweak(&mut config);
        let embedded = embedded::start_with_store(config, store, shutdown.clone()).await?;
        let cluster = Self {
            embedded,
            shutdown,
            dir,
            redis: None,
        };
        cluster.wait_ready().await?;
        Ok(cluster)
    }

    /// Client configuration for this cluster.
    pub fn client_config(&self) -> ClientConfig {
        let ca = std::fs::read(&self.embedded.ca).unwrap_or_default();
        let mut config = ClientConfig::new(self.embedded.router_url.clone(), ca);
        config.bind_addr = "127.0.0.1:0".parse().unwrap_or(config.bind_addr);
        config
    }

    /// Waits until the router reports every server linked.
    async fn wait_ready(&self) -> anyhow::Result<()> {
        let api = cim_client::RouterApi::new(&self.client_config())?;
        let want = self.embedded.servers.len() as u64;
        eventually(WAIT, || async {
            let health: serde_json::Value = api
                .call::<(), _>(http::Method::GET, "/health", None, None)
                .await
                .ok()?;
            (health["servers"].as_u64() == Some(want)).then_some(())
        })
        .await
        .context("servers never linked to the router")
    }

    /// Registers `name` and logs in over HTTP only (no QUIC session yet): returns the user id
    /// and the token, for raw connections that must not share a session with a library client.
    pub async fn http_login(&self, name: &str) -> anyhow::Result<(u64, String)> {
        let api = cim_client::RouterApi::new(&self.client_config())?;
        let id = api.register(name, "password").await?;
        let body = serde_json::json!({"name": name, "password": "password"});
        let grant: serde_json::Value = api
            .call(http::Method::POST, "/api/login", Some(&body), None)
            .await?;
        let token = grant["token"].as_str().context("login without a token")?;
        Ok((id, token.to_string()))
    }

    /// A raw QUIC connection to server `index`'s client endpoint, without the client library.
    pub async fn raw_connection(&self, index: usize) -> anyhow::Result<quinn::Connection> {
        self.raw_connection_with_window(index, None).await
    }

    /// [`TestCluster::raw_connection`] whose streams hold at most `stream_window` bytes the
    /// test has not read (`None`: the client library's window), so that a server's writes
    /// block soon on a stream the test leaves unread.
    pub async fn raw_connection_with_window(
        &self,
        index: usize,
        stream_window: Option<u32>,
    ) -> anyhow::Result<quinn::Connection> {
        let roots = tls::load_roots(&self.embedded.ca)?;
        let mut config = transport::client_config(
            tls::client_config(roots, &[ALPN_CLIENT], None)?,
            Link::Client,
        )?;
        if let Some(window) = stream_window {
            let mut narrow = transport::transport_config(Link::Client, quinn::Side::Client);
            narrow.stream_receive_window(quinn::VarInt::from_u32(window));
            config.transport_config(Arc::new(narrow));
        }
        let endpoint = transport::client_endpoint("127.0.0.1:0".parse()?, config)?;
        let addr = self.embedded.servers[index].1;
        Ok(endpoint.connect(addr, "127.0.0.1")?.await?)
    }

    /// Logs in with `token` on a new raw connection to server `index`: the connection, the
    /// login result and the control stream (the session lasts while both are kept).
    pub async fn raw_login(
        &self,
        index: usize,
        token: &str,
        token_renewal: bool,
    ) -> anyhow::Result<RawSession> {
        let conn = self.raw_connection(index).await?;
        Self::raw_login_on(conn, token, token_renewal).await
    }

    /// Logs in with `token` on `conn` (see [`TestCluster::raw_login`]).
    pub async fn raw_login_on(
        conn: quinn::Connection,
        token: &str,
        token_renewal: bool,
    ) -> anyhow::Result<RawSession> {
        let (mut send, mut recv) = conn.open_bi().await?;
        let login = ClientControl {
            kind: Some(client_control::Kind::Login(Login {
                token: token.to_string(),
                last_seen_seq: 0,
                token_renewal,
            })),
        };
        write_frame(&mut send, &login, 4096).await?;
        let reply: ServerControl = read_required(&mut recv, 4096).await?;
        let Some(server_control::Kind::LoginResult(result)) = reply.kind else {
            bail!("expected a login result");
        };
        Ok((conn, result, send, recv))
    }

    /// Registers `name` and logs in.
    pub async fn user(&self, name: &str) -> anyhow::Result<(Client, Events)> {
        let config = self.client_config();
        cim_client::register(&config, name, "password").await?;
        Ok(Client::login(&config, name, "password", LoginOptions::default()).await?)
    }

    /// Removes `user`'s route from the store, as when its server left discovery for a moment;
    /// the session stays, and the server's next renewal brings the route back.
    pub async fn drop_route(&self, user: u64) -> anyhow::Result<()> {
        let store = &self.embedded.store;
        let session = store.routes(&[user]).await?[0]
            .as_ref()
            .with_context(|| format!("user {user} has no route"))?
            .session_id;
        anyhow::ensure!(store.release_route(user, session, None).await?);
        Ok(())
    }

    /// Registers server `server_id` again with another incarnation: to the routers, a new
    /// process at the old address, without the old one's sessions.
    pub async fn reincarnate_server(&self, server_id: &str) -> anyhow::Result<()> {
        let discovery = &self.embedded.discovery;
        let mut server = discovery
            .servers()
            .borrow()
            .iter()
            .find(|s| s.id == server_id)
            .with_context(|| format!("server {server_id} is not in discovery"))?
            .clone();
        server.incarnation = server.incarnation.wrapping_add(1);
        discovery.register_server(server).await?;
        Ok(())
    }

    /// Waits (up to [`WAIT`]) until the router has removed `at_least` routes of servers that
    /// left or were replaced (`cim_router_departed_routes_total`).
    pub async fn wait_departed_routes(&self, at_least: f64) -> anyhow::Result<()> {
        let api = cim_client::RouterApi::new(&self.client_config())?;
        eventually(WAIT, || async {
            let metrics = router_metrics(&api).await.ok()?;
            let removed = metric_value(&metrics, "cim_router_departed_routes_total").ok()?;
            (removed >= at_least).then_some(())
        })
        .await
        .context("the departed server's routes stay")
    }
}

/// Polls `check` until it yields a value or `timeout` passes.
pub async fn eventually<F, Fut, T>(timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("condition not met within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The next event within `timeout`.
pub async fn next_event(events: &mut Events, timeout: Duration) -> anyhow::Result<Event> {
    tokio::time::timeout(timeout, events.next())
        .await
        .context("no event in time")?
        .context("event stream ended")
}

/// The next event within `timeout` that is not [`Event::Reconnecting`]: a reconnect that
/// takes a few attempts says so on the way, however the test goes on.
pub async fn next_event_past_retries(
    events: &mut Events,
    timeout: Duration,
) -> anyhow::Result<Event> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match next_event(events, left).await? {
            Event::Reconnecting { .. } => {}
            event => return Ok(event),
        }
    }
}

/// The next message event (skipping nothing: any other event is an error).
pub async fn next_message(events: &mut Events) -> anyhow::Result<cim_client::IncomingMessage> {
    match next_event(events, WAIT).await? {
        Event::Message(m) => Ok(m),
        other => bail!("expected a message, got {other:?}"),
    }
}

/// The router's `/metrics` text, read through `api` (one HTTPS connection of its own).
pub async fn router_metrics(api: &cim_client::RouterApi) -> anyhow::Result<String> {
    let (_, body) = api
        .raw(http::Method::GET, "/metrics", Default::default(), None)
        .await?;
    Ok(String::from_utf8(body.to_vec())?)
}

/// The value of the sample `name` (a counter's `..._total`, a gauge) in a `/metrics` text.
pub fn metric_value(metrics: &str, name: &str) -> anyhow::Result<f64> {
    let line = metrics
        .lines()
        .find(|l| l.starts_with(name))
        .with_context(|| format!("{name} missing from /metrics"))?;
    Ok(line.split_whitespace().last().unwrap_or("0").parse()?)
}

/// Path of a workspace binary next to the test executable (`target/<profile>/<name>`).
pub fn bin_path(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .context("test executable has no target directory")?;
    let path = profile_dir.join(name);
    if !path.exists() {
        bail!(
            "{} not found; build the binaries first (cargo build --workspace --bins)",
            path.display()
        );
    }
    Ok(path)
}

/// A child process whose stdout is read line by line.
pub struct Proc {
    /// The process (killed on drop).
    pub child: Child,
    /// Its standard output.
    pub stdout: Lines<BufReader<ChildStdout>>,
    /// Every line read so far.
    pub seen: Vec<String>,
}

impl Proc {
    /// Spawns `bin` with `args`, stdin and stdout piped.
    pub fn spawn(bin: &str, args: &[&str]) -> anyhow::Result<Self> {
        let mut child = Command::new(bin_path(bin)?)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            // CIM_TEST_PROC_LOGS=1 shows the processes' logs when debugging a test.
            .stderr(if std::env::var_os("CIM_TEST_PROC_LOGS").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawning {bin}"))?;
        let stdout = child.stdout.take().context("no stdout")?;
        Ok(Self {
            child,
            stdout: BufReader::new(stdout).lines(),
            seen: Vec::new(),
        })
    }

    /// Reads lines until one contains `needle`; returns that line.
    pub async fn expect_line(&mut self, needle: &str) -> anyhow::Result<String> {
        let read = async {
            while let Some(line) = self.stdout.next_line().await? {
                self.seen.push(line.clone());
                if line.contains(needle) {
                    return Ok(line);
                }
            }
            bail!("stdout ended without {needle:?}; saw {:?}", self.seen)
        };
        match tokio::time::timeout(WAIT, read).await {
            Ok(result) => result,
            Err(_) => bail!("no line containing {needle:?} in time; saw {:?}", self.seen),
        }
    }

    /// Writes one line to stdin.
    pub async fn send_line(&mut self, line: &str) -> anyhow::Result<()> {
        use tokio::io::AsyncWriteExt;
        let stdin = self.child.stdin.as_mut().context("stdin closed")?;
        stdin.write_all(format!("{line}\n").as_bytes()).await?;
        stdin.flush().await?;
        Ok(())
    }
}
