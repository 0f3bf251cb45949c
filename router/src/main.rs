//! `cim-router`: runs a router. With no `--redis`/`--zookeeper`, runs the embedded mode (a
//! router and servers in one process, nothing to install). See `cim-router --help`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use cim_router::Strategy;
use cim_router::embedded::{self, EmbeddedConfig};
use clap::Parser;
use tokio_util::sync::CancellationToken;

/// cim router: HTTPS login API and message fan-out to servers.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// HTTPS listen address.
    #[arg(long, env = "CIM_HTTP_ADDR", default_value = "127.0.0.1:8443")]
    http: SocketAddr,
    /// Directory of dev certificates (created on first run in the embedded mode).
    #[arg(long, env = "CIM_CERTS_DIR", default_value = "certs-dev")]
    certs: PathBuf,
    /// Number of servers the embedded mode starts.
    #[arg(long, env = "CIM_EMBEDDED_SERVERS", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    servers: u16,
    /// Address embedded servers bind to.
    #[arg(long, env = "CIM_SERVER_IP", default_value = "127.0.0.1")]
    server_ip: IpAddr,
    /// Route selection: round-robin, random, consistent-hash or least-loaded.
    #[arg(long, env = "CIM_ROUTE_STRATEGY", default_value = "round-robin")]
    strategy: Strategy,
    /// Client heartbeat interval in milliseconds.
    #[arg(long, env = "CIM_HEARTBEAT_MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(100..=600_000))]
    heartbeat_ms: u64,
    /// Dead-peer timeout in milliseconds (must exceed the heartbeat interval).
    #[arg(long, env = "CIM_HEARTBEAT_TIMEOUT_MS", default_value_t = 15000, value_parser = clap::value_parser!(u64).range(200..=3_600_000))]
    heartbeat_timeout_ms: u64,
    /// Log format: text or json.
    #[arg(long, env = "CIM_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_tracing(&args.log_format);
    if args.heartbeat_timeout_ms <= args.heartbeat_ms {
        anyhow::bail!("--heartbeat-timeout-ms must be larger than --heartbeat-ms");
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
    };
    let cluster = embedded::start(config, shutdown.clone())
        .await
        .context("starting embedded cluster")?;
    if cluster.certs_created {
        println!("created dev certificates in {}", args.certs.display());
    }
    println!(
        "cim embedded mode: router and {} servers in one process",
        cluster.servers.len()
    );
    println!("router: {}", cluster.router_url);
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
    wait_for_signal().await;
    shutdown.cancel();
    cluster.wait().await;
    Ok(())
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
