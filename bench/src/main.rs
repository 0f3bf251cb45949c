//! `cim-bench`: load-test harness. `cim-bench private`, `group`, `login`, `idle`, `lossy`,
//! `failover`, and the quinn floor (`floor-private`, `floor-idle`, `floor-login`); see
//! `cim-bench --help`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use cim_bench::run::{Options, Report, Scenario, run};
use cim_bench::target::Target;
use clap::{Parser, ValueEnum};

/// mimalloc: the hot paths allocate per message and per stream; glibc's malloc cost about
/// 15% of CPU there and fragments per-connection memory.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ScenarioArg {
    Private,
    Group,
    Login,
    Idle,
    Lossy,
    Failover,
    /// `private` on the quinn floor: bare quinn with cim's traffic shape and settings.
    FloorPrivate,
    /// `idle` on the quinn floor.
    FloorIdle,
    /// `login` on the quinn floor: a TLS-over-TCP exchange, then a QUIC handshake.
    FloorLogin,
    /// The floor's server process (started by the floor scenarios).
    #[value(hide = true)]
    FloorServer,
}

/// Drives many real clients through a real cim and reports what it measured.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// What to measure.
    #[arg(value_enum)]
    scenario: ScenarioArg,
    /// Router of an existing cluster (default: start an embedded cim-router process).
    #[arg(long, requires = "ca")]
    router: Option<String>,
    /// CA of the existing cluster.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Servers of the embedded cluster.
    #[arg(long, default_value_t = 2)]
    servers: u16,
    /// Clients (private, lossy, login).
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Seconds of sending.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Open-loop send rate in messages per second (default: closed loop at full speed).
    #[arg(long)]
    rate: Option<u64>,
    /// Group members (group).
    #[arg(long, default_value_t = 1000)]
    members: usize,
    /// Members sending to the group (group).
    #[arg(long, default_value_t = 8)]
    senders: usize,
    /// Send to `all` (everyone online, CIM's group chat) instead of a named group of the
    /// members (group; the scenario before session 23).
    #[arg(long)]
    broadcast: bool,
    /// Idle connections (idle).
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Relay loss in percent (lossy).
    #[arg(long, default_value_t = 5.0)]
    loss: f64,
    /// Messages each sender keeps in flight in the closed loop (private, lossy, group).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    window: u16,
    /// Message body size in bytes.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Concurrent logins during set-up and the login storm.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Relay seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Server to kill, as SERVER_ID=PID (failover; needs --router: `bench/failover.sh`).
    #[arg(long, value_parser = parse_kill)]
    kill: Option<(String, u32)>,
    /// Certificate set of the floor server (floor-server).
    #[arg(long, hide = true)]
    certs: Option<PathBuf>,
    /// Write latency by send time (deliveries, p50, p99 and max per 100 ms window) as CSV to
    /// this file: stalls show as windows whose latency stands out.
    #[arg(long)]
    timeline: Option<PathBuf>,
    /// Print one JSON object on stdout instead of a table.
    #[arg(long)]
    json: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    if matches!(args.scenario, ScenarioArg::FloorServer) {
        let certs = args.certs.context("floor-server needs --certs")?;
        return cim_bench::floor::serve(&certs).await;
    }
    if args.clients < 2 || args.members < 2 {
        bail!("--clients and --members must be at least 2");
    }
    let scenario = match args.scenario {
        ScenarioArg::Private => Scenario::Private,
        ScenarioArg::Group => Scenario::Group,
        ScenarioArg::Login => Scenario::Login,
        ScenarioArg::Idle => Scenario::Idle,
        ScenarioArg::Lossy => Scenario::Lossy,
        ScenarioArg::Failover => Scenario::Failover,
        ScenarioArg::FloorPrivate => Scenario::FloorPrivate,
        ScenarioArg::FloorIdle => Scenario::FloorIdle,
        ScenarioArg::FloorLogin => Scenario::FloorLogin,
        ScenarioArg::FloorServer => unreachable!("served above"),
    };
    if args.timeline.is_some() && !scenario.sends_messages() {
        bail!(
            "--timeline needs a scenario that sends messages (private, group, lossy, floor-private)"
        );
    }
    let target = match (&args.router, &args.ca) {
        _ if scenario.on_floor() => Target::floor().await?,
        (Some(url), Some(ca)) => Target::external(url.clone(), ca)?,
        _ => Target::embedded(args.servers, &[]).await?,
    };
    let opts = Options {
        scenario,
        clients: args.clients,
        duration: Duration::from_secs(args.duration),
        rate: args.rate,
        window: usize::from(args.window),
        members: args.members,
        senders: args.senders,
        broadcast: args.broadcast,
        connections: args.connections,
        loss_pct: args.loss,
        size: args.size,
        concurrency: args.concurrency.max(1),
        seed: args.seed,
        progress: !args.json,
        kill: args.kill.clone(),
        timeline: args.timeline.clone(),
        drain_limit: Options::DRAIN_LIMIT,
    };
    if !args.json {
        eprintln!(
            "cim-bench {}: target {}",
            scenario.name(),
            target.router_url
        );
    }
    let report = run(&opts, &target).await?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_table(&report);
    }
    let faults = cim_bench::compare::faults(&serde_json::to_value(&report)?);
    if !faults.is_empty() {
        bail!("{}", faults.join(", "));
    }
    Ok(())
}

/// `SERVER_ID=PID`.
fn parse_kill(arg: &str) -> Result<(String, u32), String> {
    let (id, pid) = arg
        .split_once('=')
        .ok_or_else(|| "expected SERVER_ID=PID".to_string())?;
    let pid = pid.parse().map_err(|e| format!("pid: {e}"))?;
    Ok((id.to_string(), pid))
}

fn print_percentiles(label: &str, p: cim_bench::stats::Percentiles) {
    println!(
        "{label:<18}p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
        p.p50, p.p90, p.p99, p.p999, p.max
    );
}

fn print_table(r: &Report) {
    println!("scenario          {}", r.scenario);
    println!("clients           {}", r.clients);
    println!("duration          {:.2} s", r.duration_s);
    if let Some(p) = r.login_latency_us {
        print_percentiles("login (us)", p);
    }
    if let Some(f) = &r.failover {
        println!("victims           {} ({} back)", f.victims, f.recovered);
        println!(
            "re-logins         {} with the token, {} with the password",
            f.token_relogins, f.password_relogins
        );
        print_percentiles("noticed (us)", f.detect_us);
        print_percentiles("back after (us)", f.recover_us);
        println!("last back after   {:.2} s (from the kill)", f.last_back_s);
        return;
    }
    if let Some(l) = r.logins_per_sec {
        println!("logins/s          {l:.0}");
        if let Some(h) = r.harness_cpu_us_per_login {
            match r.cluster_cpu_us_per_login {
                Some(c) => println!("cpu per login     cluster {c:.0} us, harness {h:.0} us"),
                None => println!("cpu per login     harness {h:.0} us"),
            }
        }
        return;
    }
    if let Some(b) = r.server_rss_bytes_per_conn {
        println!(
            "server memory     {b} bytes per connection ({:.1} KiB)",
            b as f64 / 1024.0
        );
        if let Some(a) = r.server_rss_bytes_per_account {
            println!("  of which         {a} bytes per account registered before the logins");
        }
        return;
    }
    if let Some(loss) = r.loss_pct {
        println!("relay loss        {loss}%");
    }
    if let Some(rate) = r.rate {
        println!("offered rate      {rate} msgs/s");
    }
    if let Some(window) = r.window.filter(|w| *w > 1) {
        println!("in flight         {window} messages per sender");
    }
    println!("sent (acked)      {}", r.sent);
    println!("delivered         {}", r.delivered);
    println!("lost              {}", r.lost);
    println!("duplicated        {}", r.duplicated);
    println!("misdelivered      {}", r.misdelivered);
    println!("send errors       {}", r.send_errors);
    println!("throughput        {:.0} deliveries/s", r.msgs_per_sec);
    if let Some(d) = r.client_datagrams_per_msg {
        println!("client datagrams  {d:.2} per delivery (sent + received)");
    }
    if let Some(h) = r.harness_cpu_us_per_msg {
        match r.cluster_cpu_us_per_msg {
            Some(c) => println!("cpu per delivery  cluster {c:.1} us, harness {h:.1} us"),
            None => println!("cpu per delivery  harness {h:.1} us"),
        }
    }
    print_percentiles("latency (us)", r.latency_us);
    print_percentiles("send->ack (us)", r.send_ack_latency_us);
    println!("git {}  command: {}", r.git_rev, r.command);
}
