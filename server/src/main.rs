//! `cim-server`: runs one connection server that registers in ZooKeeper. See `cim-server --help`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use cim_certs::CertPaths;
use cim_core::discovery::{Discovery, ZkDiscovery};
use cim_core::token::TokenKey;
use cim_server::{Server, ServerConfig};
use clap::Parser;
use tokio_util::sync::CancellationToken;

/// mimalloc: the hot paths allocate per message and per stream; glibc's malloc cost about
/// 15% of CPU there and fragments per-connection memory.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// cim connection server: holds client QUIC connections, delivers router pushes.
///
/// Every option can also come from a TOML file given with --config (keys are the long option
/// names, e.g. `heartbeat-ms = 5000`) or from its CIM_... environment variable. Precedence:
/// command line, then the file, then the environment.
#[derive(Parser, Debug)]
#[command(version, args_override_self = true)]
struct Args {
    /// TOML file of options (see examples/).
    #[arg(long, env = "CIM_CONFIG")]
    config: Option<PathBuf>,
    /// Unique server id (letters, digits, '-', '_', '.').
    #[arg(long, env = "CIM_SERVER_ID")]
    id: String,
    /// ZooKeeper hosts, e.g. `127.0.0.1:2181,10.0.0.2:2181`.
    #[arg(long, env = "CIM_ZOOKEEPER")]
    zookeeper: String,
    /// ZooKeeper folder holding cim's nodes (several clusters can share one ensemble).
    #[arg(long, env = "CIM_ZK_ROOT", default_value = "/cim")]
    zk_root: String,
    /// ZooKeeper session timeout in milliseconds: a dead server leaves discovery after this.
    #[arg(long, env = "CIM_ZK_SESSION_TIMEOUT_MS", default_value_t = 6000, value_parser = clap::value_parser!(u64).range(2000..=60_000))]
    zk_session_timeout_ms: u64,
    /// QUIC address clients connect to.
    #[arg(long, env = "CIM_LISTEN", default_value = "127.0.0.1:7000")]
    listen: SocketAddr,
    /// QUIC address routers connect to (mutual TLS).
    #[arg(long, env = "CIM_INTERNAL", default_value = "127.0.0.1:7100")]
    internal: SocketAddr,
    /// IP announced to routers and clients when listening on 0.0.0.0 or [::].
    #[arg(long, env = "CIM_ADVERTISE_IP")]
    advertise_ip: Option<IpAddr>,
    /// Certificate directory (from `cim-certs`): server.pem, server-key.pem, ca.pem, token-secret.
    #[arg(long, env = "CIM_CERTS_DIR", default_value = "certs-dev")]
    certs: PathBuf,
    /// Interval at which clients ping, in milliseconds.
    #[arg(long, env = "CIM_HEARTBEAT_MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(100..=600_000))]
    heartbeat_ms: u64,
    /// Dead-peer timeout in milliseconds (must exceed the heartbeat interval).
    #[arg(long, env = "CIM_HEARTBEAT_TIMEOUT_MS", default_value_t = 15000, value_parser = clap::value_parser!(u64).range(200..=3_600_000))]
    heartbeat_timeout_ms: u64,
    /// How often open sessions' routes are renewed, in milliseconds (keep under the routers'
    /// route lease, 30 s by default).
    #[arg(long, env = "CIM_RENEW_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(100..=600_000))]
    renew_ms: u64,
    /// How long the server may have no router linked before it drains its clients to other
    /// servers, in milliseconds.
    #[arg(long, env = "CIM_ROUTERLESS_DRAIN_MS", default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1000..=3_600_000))]
    routerless_drain_ms: u64,
    /// Lifetime of the session tokens this server renews, in seconds (keep equal to the
    /// routers' --token-ttl-secs).
    #[arg(long, env = "CIM_TOKEN_TTL_SECS", default_value_t = 600, value_parser = clap::value_parser!(u64).range(2..=86_400))]
    token_ttl_secs: u64,
    /// Client connections on this server.
    #[arg(long, env = "CIM_MAX_CONNECTIONS", default_value_t = 100_000)]
    max_connections: usize,
    /// Client connections per IP address.
    #[arg(long, env = "CIM_MAX_CONNECTIONS_PER_IP", default_value_t = 1_000)]
    max_connections_per_ip: usize,
    /// Sustained messages per second per session (burst: twice that).
    #[arg(long, env = "CIM_MAX_MSGS_PER_SEC", default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    max_msgs_per_sec: u32,
    /// Plain-HTTP address for /metrics, /health and /ready (keep it on a private network).
    #[arg(long, env = "CIM_METRICS_ADDR")]
    metrics: Option<SocketAddr>,
    /// Log format: text or json.
    #[arg(long, env = "CIM_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Args = cim_core::config::parse();
    cim_core::logging::init(&args.log_format);
    if args.heartbeat_timeout_ms <= args.heartbeat_ms {
        anyhow::bail!("--heartbeat-timeout-ms must be larger than --heartbeat-ms");
    }
    let certs = CertPaths::in_dir(&args.certs);
    let secret = std::fs::read_to_string(certs.token_secret())
        .with_context(|| format!("reading {}", certs.token_secret().display()))?;
    let token_key = TokenKey::from_hex(&secret).context("--certs token-secret")?;
    let mut config = ServerConfig::new(
        args.id.clone(),
        args.listen,
        args.internal,
        certs.server_cert(),
        certs.server_key(),
        certs.ca_cert(),
        token_key,
    );
    config.advertise_ip = args.advertise_ip;
    config.heartbeat_interval = Duration::from_millis(args.heartbeat_ms);
    config.heartbeat_timeout = Duration::from_millis(args.heartbeat_timeout_ms);
    config.renew_interval = Duration::from_millis(args.renew_ms);
    config.routerless_drain_after = Duration::from_millis(args.routerless_drain_ms);
    config.token_ttl = Duration::from_secs(args.token_ttl_secs);
    config.limits = cim_server::Limits {
        max_connections: args.max_connections,
        max_connections_per_ip: args.max_connections_per_ip,
        messages_per_sec: args.max_msgs_per_sec,
        message_burst: args.max_msgs_per_sec.saturating_mul(2),
    };
    let mut registry = cim_core::metrics::Registry::default();
    config.metrics = cim_core::metrics::ServerMetrics::new(&mut registry);
    config.registry = Some(Arc::new(registry));
    config.ops_addr = args.metrics;
    let server = Server::bind(config).context("starting server")?;
    let zk = ZkDiscovery::connect_patiently(
        &args.zookeeper,
        &args.zk_root,
        Duration::from_millis(args.zk_session_timeout_ms),
        ZkDiscovery::START_PATIENCE,
    )
    .await
    .context("connecting to zookeeper")?;
    let ops = server
        .ops_addr()
        .map(|addr| format!(", ops on {addr}"))
        .unwrap_or_default();
    println!(
        "server {} listening for clients on {} and routers on {}{ops}",
        args.id,
        server.client_addr(),
        server.internal_addr()
    );
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        cim_core::logging::wait_for_signal().await;
        signal.cancel();
    });
    let discovery: Arc<dyn Discovery> = zk.clone();
    server
        .run(discovery, shutdown)
        .await
        .context("server failed")?;
    zk.close().await;
    Ok(())
}
