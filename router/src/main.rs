//! `cim-router`: runs a router. With `--redis` and `--zookeeper` it joins a cluster; with
//! neither it runs the embedded mode (a router and servers in one process, nothing to
//! install). See `cim-router --help`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use cim_certs::CertPaths;
use cim_core::discovery::{Discovery, ZkDiscovery};
use cim_core::logging;
use cim_core::token::TokenKey;
use cim_router::embedded::{self, EmbeddedConfig};
use cim_router::store::{RedisStore, Store};
use cim_router::{Router, RouterConfig, Strategy};
use clap::Parser;
use tokio_util::sync::CancellationToken;

/// mimalloc: the hot paths allocate per message and per stream; glibc's malloc cost about
/// 15% of CPU there and fragments per-connection memory.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// cim router: HTTPS login API and message fan-out to servers.
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
    /// HTTPS listen address.
    #[arg(long, env = "CIM_HTTP_ADDR", default_value = "127.0.0.1:8443")]
    http: SocketAddr,
    /// Local IP address the links to servers leave from (cluster mode; default: any address
    /// of --http's family). The embedded mode uses its servers' address.
    #[arg(long, env = "CIM_LINK_IP")]
    link_ip: Option<IpAddr>,
    /// Certificate directory (from `cim-certs`; created on first run in the embedded mode).
    #[arg(long, env = "CIM_CERTS_DIR", default_value = "certs-dev")]
    certs: PathBuf,
    /// Route selection: round-robin, random, consistent-hash or least-loaded.
    #[arg(long, env = "CIM_ROUTE_STRATEGY", default_value = "round-robin")]
    strategy: Strategy,
    /// Redis URL, e.g. `redis://127.0.0.1:6379` (cluster mode; needs --zookeeper too).
    #[arg(long, env = "CIM_REDIS")]
    redis: Option<String>,
    /// ZooKeeper hosts, e.g. `127.0.0.1:2181` (cluster mode; needs --redis too).
    #[arg(long, env = "CIM_ZOOKEEPER")]
    zookeeper: Option<String>,
    /// ZooKeeper folder holding cim's nodes (several clusters can share one ensemble).
    #[arg(long, env = "CIM_ZK_ROOT", default_value = "/cim")]
    zk_root: String,
    /// ZooKeeper session timeout in milliseconds.
    #[arg(long, env = "CIM_ZK_SESSION_TIMEOUT_MS", default_value_t = 6000, value_parser = clap::value_parser!(u64).range(2000..=60_000))]
    zk_session_timeout_ms: u64,
    /// Router id in cluster mode (default: derived from --http).
    #[arg(long, env = "CIM_ROUTER_ID")]
    id: Option<String>,
    /// Lease on a route in milliseconds: a server's routes lapse this long after its last
    /// renewal.
    #[arg(long, env = "CIM_ROUTE_LEASE_MS", default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(1000..=3_600_000))]
    route_lease_ms: u64,
    /// Lease on the router's message-id node in Redis, in milliseconds (renewed every sixth of
    /// it; a router that cannot renew it refuses messages once it lapses).
    #[arg(long, env = "CIM_ID_NODE_LEASE_MS", default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(600..=600_000))]
    id_node_lease_ms: u64,
    /// Number of servers the embedded mode starts.
    #[arg(long, env = "CIM_EMBEDDED_SERVERS", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    servers: u16,
    /// Address embedded servers bind to.
    #[arg(long, env = "CIM_SERVER_IP", default_value = "127.0.0.1")]
    server_ip: IpAddr,
    /// Client heartbeat interval of embedded servers, in milliseconds.
    #[arg(long, env = "CIM_HEARTBEAT_MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(100..=600_000))]
    heartbeat_ms: u64,
    /// Dead-peer timeout of embedded servers in milliseconds (must exceed the heartbeat interval).
    #[arg(long, env = "CIM_HEARTBEAT_TIMEOUT_MS", default_value_t = 15000, value_parser = clap::value_parser!(u64).range(200..=3_600_000))]
    heartbeat_timeout_ms: u64,
    /// Argon2id memory cost of new password hashes, in KiB (OWASP minimum: 19456).
    #[arg(long, env = "CIM_ARGON2_MEMORY_KIB", default_value_t = 19_456, value_parser = clap::value_parser!(u32).range(8..=4_194_304))]
    argon2_memory_kib: u32,
    /// Argon2id iterations of new password hashes.
    #[arg(long, env = "CIM_ARGON2_ITERATIONS", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    argon2_iterations: u32,
    /// Failed logins per user per minute before the user is locked for the rest of the minute.
    #[arg(long, env = "CIM_MAX_LOGIN_FAILURES_PER_USER", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    max_login_failures_per_user: u32,
    /// Login attempts per client IP address per minute.
    #[arg(long, env = "CIM_MAX_LOGIN_ATTEMPTS_PER_IP", default_value_t = 120, value_parser = clap::value_parser!(u32).range(1..))]
    max_login_attempts_per_ip: u32,
    /// Registrations from one client IP address per minute.
    #[arg(long, env = "CIM_MAX_REGISTRATIONS_PER_IP", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    max_registrations_per_ip: u32,
    /// API requests with a session token (sends, groups, listings) per user per second.
    #[arg(long, env = "CIM_MAX_API_REQUESTS_PER_USER", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    max_api_requests_per_user: u32,
    /// Embedded servers: client connections per server.
    #[arg(long, env = "CIM_MAX_CONNECTIONS", default_value_t = 100_000)]
    max_connections: usize,
    /// Embedded servers: client connections per IP address.
    #[arg(long, env = "CIM_MAX_CONNECTIONS_PER_IP", default_value_t = 1_000)]
    max_connections_per_ip: usize,
    /// Embedded servers: sustained messages per second per session (burst: twice that).
    #[arg(long, env = "CIM_MAX_MSGS_PER_SEC", default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    max_msgs_per_sec: u32,
    /// Most entries kept in each user's inbox (oldest dropped first).
    #[arg(long, env = "CIM_INBOX_MAX_LEN", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    inbox_max_len: u64,
    /// Age after which inbox entries are dropped, in seconds (default 7 days).
    #[arg(long, env = "CIM_INBOX_TTL_SECS", default_value_t = 604_800, value_parser = clap::value_parser!(u64).range(60..=31_536_000))]
    inbox_ttl_secs: u64,
    /// Most members a group may have.
    #[arg(long, env = "CIM_MAX_GROUP_SIZE", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(2..=1_000_000))]
    max_group_size: u64,
    /// Most groups a user may be in (created or joined).
    #[arg(long, env = "CIM_MAX_GROUPS_PER_USER", default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_groups_per_user: u64,
    /// Lifetime of session tokens in seconds. Connected clients get fresh ones while their
    /// session lives; a token lets its holder re-log in without the password (`POST
    /// /api/relogin`) until it expires. Keep the servers' --token-ttl-secs equal.
    #[arg(long, env = "CIM_TOKEN_TTL_SECS", default_value_t = 600, value_parser = clap::value_parser!(u64).range(2..=86_400))]
    token_ttl_secs: u64,
    /// Credential for the admin page at /admin, at least 16 characters (embedded mode: a
    /// random one if not given).
    #[arg(long, env = "CIM_ADMIN_TOKEN", hide_env_values = true, value_parser = admin_token)]
    admin_token: Option<String>,
    /// Log format: text or json.
    #[arg(long, env = "CIM_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// With --redis: give each account and group made before their names were unique
    /// whatever their case its key for that, say what it did, and exit (once, after every
    /// router is upgraded).
    #[arg(long)]
    fold_names: bool,
}

/// Parses `--admin-token`: an empty or short one (an unset variable in a deployment template
/// reads as empty) would open the admin page to anyone, or to a quick guess.
fn admin_token(token: &str) -> Result<String, String> {
    if token.len() < MIN_ADMIN_TOKEN {
        return Err(format!(
            "the admin token must be at least {MIN_ADMIN_TOKEN} characters (leave it out to turn the admin page off)"
        ));
    }
    Ok(token.to_string())
}

/// Shortest admin token accepted.
const MIN_ADMIN_TOKEN: usize = 16;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Args = cim_core::config::parse();
    logging::init(&args.log_format);
    if args.fold_names {
        let redis = args
            .redis
            .as_deref()
            .context("--fold-names needs --redis")?;
        return fold_names(redis).await;
    }
    match (&args.redis, &args.zookeeper) {
        (None, None) => run_embedded(&args).await,
        (Some(redis), Some(zookeeper)) => run_cluster(&args, redis, zookeeper).await,
        _ => bail!(
            "cluster mode needs both --redis and --zookeeper (give neither for the embedded mode)"
        ),
    }
}

/// `--fold-names`: see [`RedisStore::fold_names`].
async fn fold_names(redis: &str) -> anyhow::Result<()> {
    let store = RedisStore::connect(redis)
        .await
        .with_context(|| format!("connecting to redis at {redis}"))?;
    let done = store.fold_names().await?;
    println!(
        "names made unique whatever their case: {} now, {} already; {} name keys naming no account",
        done.added, done.present, done.skipped
    );
    if done.clash_count > 0 {
        let clashes: Vec<String> = (done.clashes.iter())
            .map(|(name, holder)| format!("{name} ({holder} holds the key)"))
            .collect();
        println!(
            "{} names differ from another account's only in case; each is still found as \
             registered, and other cases find the one holding the key: {}",
            done.clash_count,
            clashes.join(", ")
        );
    }
    let groups = store.fold_group_names().await?;
    println!(
        "group names made unique whatever their case: {} now, {} already",
        groups.added, groups.present
    );
    if groups.clash_count > 0 {
        let clashes: Vec<String> = (groups.clashes.iter())
            .map(|(name, holder)| format!("#{name} (#{holder} holds the key)"))
            .collect();
        println!(
            "{} group names differ from another group's only in case; both groups stay: {}",
            groups.clash_count,
            clashes.join(", ")
        );
    }
    Ok(())
}

fn password_cost(args: &Args) -> cim_router::password::Cost {
    cim_router::password::Cost {
        memory_kib: args.argon2_memory_kib,
        iterations: args.argon2_iterations,
    }
}

fn inbox_limits(args: &Args) -> cim_router::store::InboxLimits {
    cim_router::store::InboxLimits {
        max_len: args.inbox_max_len as usize,
        ttl: Duration::from_secs(args.inbox_ttl_secs),
        ..Default::default()
    }
}

fn login_limits(args: &Args) -> cim_router::LoginLimits {
    cim_router::LoginLimits {
        failures_per_user: args.max_login_failures_per_user,
        attempts_per_ip: args.max_login_attempts_per_ip,
    }
}

fn api_limits(args: &Args) -> cim_router::ApiLimits {
    cim_router::ApiLimits {
        registrations_per_ip: args.max_registrations_per_ip,
        requests_per_user: args.max_api_requests_per_user,
    }
}

async fn run_cluster(args: &Args, redis: &str, zookeeper: &str) -> anyhow::Result<()> {
    let certs = CertPaths::in_dir(&args.certs);
    let secret = std::fs::read_to_string(certs.token_secret())
        .with_context(|| format!("reading {}", certs.token_secret().display()))?;
    let token_key = TokenKey::from_hex(&secret).context("--certs token-secret")?;
    let id = args
        .id
        .clone()
        .unwrap_or_else(|| format!("router-{}", args.http).replace([':', '[', ']'], "-"));
    let mut config = RouterConfig::new(
        id.clone(),
        args.http,
        certs.router_cert(),
        certs.router_key(),
        certs.ca_cert(),
        token_key,
    );
    config.link_ip = args.link_ip;
    config.strategy = args.strategy;
    config.password_cost = password_cost(args);
    config.login_limits = login_limits(args);
    config.api_limits = api_limits(args);
    config.max_group_size = args.max_group_size as usize;
    config.max_groups_per_user = args.max_groups_per_user as usize;
    config.token_ttl = Duration::from_secs(args.token_ttl_secs);
    config.admin_token = args.admin_token.clone();
    config.inbox = inbox_limits(args);
    config.route_lease = Duration::from_millis(args.route_lease_ms);
    config.id_node_lease = Duration::from_millis(args.id_node_lease_ms);
    let mut registry = cim_core::metrics::Registry::default();
    config.metrics = cim_core::metrics::RouterMetrics::new(&mut registry);
    config.registry = Some(Arc::new(registry));
    let router = Router::bind(config).await.context("starting router")?;
    let store: Arc<dyn Store> = Arc::new(
        RedisStore::connect(redis)
            .await
            .with_context(|| format!("connecting to redis at {redis}"))?,
    );
    let zk = ZkDiscovery::connect_patiently(
        zookeeper,
        &args.zk_root,
        Duration::from_millis(args.zk_session_timeout_ms),
        ZkDiscovery::START_PATIENCE,
    )
    .await
    .context("connecting to zookeeper")?;
    println!("router {id}: https://{}", router.http_addr());
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        logging::wait_for_signal().await;
        signal.cancel();
    });
    let discovery: Arc<dyn Discovery> = zk.clone();
    router
        .run(store, discovery, shutdown)
        .await
        .context("router failed")?;
    zk.close().await;
    Ok(())
}

async fn run_embedded(args: &Args) -> anyhow::Result<()> {
    if args.heartbeat_timeout_ms <= args.heartbeat_ms {
        bail!("--heartbeat-timeout-ms must be larger than --heartbeat-ms");
    }
    let shutdown = CancellationToken::new();
    let config = EmbeddedConfig {
        http_addr: args.http,
        certs_dir: args.certs.clone(),
        servers: usize::from(args.servers),
        server_ip: args.server_ip,
        strategy: args.strategy,
        heartbeat_interval: Duration::from_millis(args.heartbeat_ms),
        heartbeat_timeout: Duration::from_millis(args.heartbeat_timeout_ms),
        renew_interval: cim_server::ServerConfig::DEFAULT_RENEW_INTERVAL,
        password_cost: password_cost(args),
        login_limits: login_limits(args),
        api_limits: api_limits(args),
        max_group_size: args.max_group_size as usize,
        max_groups_per_user: args.max_groups_per_user as usize,
        admin_token: args.admin_token.clone(),
        inbox: inbox_limits(args),
        token_ttl: Duration::from_secs(args.token_ttl_secs),
        http_request_timeout: cim_router::RouterConfig::DEFAULT_HTTP_REQUEST_TIMEOUT,
        server_limits: cim_server::Limits {
            max_connections: args.max_connections,
            max_connections_per_ip: args.max_connections_per_ip,
            messages_per_sec: args.max_msgs_per_sec,
            message_burst: args.max_msgs_per_sec.saturating_mul(2),
        },
    };
    let cluster = embedded::start(config, shutdown.clone())
        .await
        .context("starting embedded cluster")?;
    if cluster.certs_created {
        println!("created dev certificates in {}", args.certs.display());
    }
    println!(
        "cim embedded mode: router and {} servers in one process; accounts, groups and \
         messages live in its memory and are gone when it stops",
        cluster.servers.len()
    );
    println!("router: {}", cluster.router_url);
    println!("admin: {}", cluster.admin_url);
    for (id, addr) in &cluster.servers {
        println!("server: {id} at {addr}");
    }
    println!("connect with:");
    println!(
        "  cargo run --release -p cim-client -- --router {} --ca {} --name alice --password secret --register",
        cluster.router_url,
        cluster.ca.display()
    );
    println!("press Ctrl-C to stop");
    logging::wait_for_signal().await;
    shutdown.cancel();
    cluster.wait().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::Args;

    #[test]
    fn an_empty_or_short_admin_token_is_refused() {
        let parse = |token: &str| Args::try_parse_from(["cim-router", "--admin-token", token]);
        assert!(
            parse("").is_err(),
            "an empty token would open the admin page"
        );
        assert!(parse("short").is_err());
        let args = parse("sixteen-chars-ok").expect("a long enough token");
        assert_eq!(args.admin_token.as_deref(), Some("sixteen-chars-ok"));
    }
}
