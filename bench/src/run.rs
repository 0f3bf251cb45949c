//! The scenarios: set up users and clients, drive load for a bounded time, drain, and report.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use cim_client::{Client, ClientConfig, Event, Events, LoginOptions};
use futures_util::stream;
use futures_util::{StreamExt, TryStreamExt};
use rand::Rng;
use serde::Serialize;
use tokio::sync::watch;

use crate::relay::{Impairments, Relay};
use crate::stats::{
    Audience, Latencies, MessageKey, Percentiles, TIMELINE_WINDOW_US, Tracker, decode_body,
    encode_body, timeline_windows,
};
use crate::target::{Target, process_cpu_seconds};

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// Private messages between random peers.
    Private,
    /// Broadcasts to a group of members.
    Group,
    /// A storm of logins.
    Login,
    /// Many idle connections; server memory per connection.
    Idle,
    /// `Private` through the lossy relay.
    Lossy,
    /// A server is killed; its clients find out and log in again elsewhere.
    Failover,
    /// `Private` on the quinn floor (`crate::floor`).
    FloorPrivate,
    /// `Idle` on the quinn floor.
    FloorIdle,
    /// `Login` on the quinn floor.
    FloorLogin,
}

impl Scenario {
    /// Name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Private => "private",
            Scenario::Group => "group",
            Scenario::Login => "login",
            Scenario::Idle => "idle",
            Scenario::Lossy => "lossy",
            Scenario::Failover => "failover",
            Scenario::FloorPrivate => "floor-private",
            Scenario::FloorIdle => "floor-idle",
            Scenario::FloorLogin => "floor-login",
        }
    }

    /// The scenario named `name` (as [`Scenario::name`] gives it).
    pub fn from_name(name: &str) -> Option<Self> {
        [
            Scenario::Private,
            Scenario::Group,
            Scenario::Login,
            Scenario::Idle,
            Scenario::Lossy,
            Scenario::Failover,
            Scenario::FloorPrivate,
            Scenario::FloorIdle,
            Scenario::FloorLogin,
        ]
        .into_iter()
        .find(|s| s.name() == name)
    }

    /// Whether the scenario sends messages (and so has latencies for `--timeline`).
    pub fn sends_messages(self) -> bool {
        matches!(
            self,
            Scenario::Private | Scenario::Group | Scenario::Lossy | Scenario::FloorPrivate
        )
    }

    /// Whether the scenario runs on the quinn floor instead of a cim.
    pub fn on_floor(self) -> bool {
        matches!(
            self,
            Scenario::FloorPrivate | Scenario::FloorIdle | Scenario::FloorLogin
        )
    }
}

/// Knobs of a run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Scenario.
    pub scenario: Scenario,
    /// Clients (private, lossy, login).
    pub clients: usize,
    /// Sending time.
    pub duration: Duration,
    /// Open-loop rate in messages per second (closed loop when `None`).
    pub rate: Option<u64>,
    /// Messages each sender keeps in flight in the closed loop (private, lossy, group).
    pub window: usize,
    /// Group members (group).
    pub members: usize,
    /// Members that send (group).
    pub senders: usize,
    /// Send to `all` (everyone online) instead of a named group of the members (group).
    pub broadcast: bool,
    /// Idle connections (idle).
    pub connections: usize,
    /// Loss for the relay, in percent (lossy).
    pub loss_pct: f64,
    /// Message body size in bytes.
    pub size: usize,
    /// Concurrent logins during set-up and the login storm.
    pub concurrency: usize,
    /// Seed of the relay.
    pub seed: u64,
    /// Print progress to stderr.
    pub progress: bool,
    /// Server to kill with SIGKILL and its process id (failover).
    pub kill: Option<(String, u32)>,
    /// Where to write latency per window of send time (`--timeline`).
    pub timeline: Option<std::path::PathBuf>,
    /// Longest wait after sending for acked messages to arrive; those still missing are lost.
    pub drain_limit: Duration,
}

impl Options {
    /// How long a run waits for acked messages to arrive unless told otherwise.
    pub const DRAIN_LIMIT: Duration = Duration::from_secs(15);
}

/// The result of a run (serialised with `--json`).
#[derive(Debug, Clone, Serialize, Default)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// Clients connected.
    pub clients: usize,
    /// Measured time, seconds.
    pub duration_s: f64,
    /// Messages acked.
    pub sent: u64,
    /// Distinct deliveries seen.
    pub delivered: u64,
    /// Acked deliveries never seen.
    pub lost: u64,
    /// Deliveries seen twice.
    pub duplicated: u64,
    /// Deliveries of acked messages to a client they were not sent to.
    pub misdelivered: u64,
    /// Delivered messages per second (deliveries per second for `group`).
    pub msgs_per_sec: f64,
    /// Sender timestamp to recipient application.
    pub latency_us: Percentiles,
    /// Send to ack.
    pub send_ack_latency_us: Percentiles,
    /// Sends that failed.
    pub send_errors: u64,
    /// Logins per second (login).
    pub logins_per_sec: Option<f64>,
    /// Time each login took, concurrency-many at a time (every scenario logs its clients in;
    /// through the relay for `lossy`).
    pub login_latency_us: Option<Percentiles>,
    /// Server process memory per connection (idle), accounts included: the embedded
    /// process's store holds the accounts its clients were registered with.
    pub server_rss_bytes_per_conn: Option<u64>,
    /// Of that, what registering the accounts added, before any client connected (idle).
    pub server_rss_bytes_per_account: Option<u64>,
    /// UDP datagrams the clients sent and received per delivered message (per delivery for
    /// `group`) while sending and draining: a measure of protocol overhead, far less sensitive
    /// to the machine's noise than the rates (it still depends on load, as acks ride on
    /// whatever else is sent).
    pub client_datagrams_per_msg: Option<f64>,
    /// CPU time of the embedded cluster process per delivered message (per delivery for
    /// `group`), in microseconds, over the sending window and the drain.
    pub cluster_cpu_us_per_msg: Option<f64>,
    /// The same for the harness itself, which shares the machine.
    pub harness_cpu_us_per_msg: Option<f64>,
    /// CPU time of the embedded cluster process per login, in microseconds (login).
    pub cluster_cpu_us_per_login: Option<f64>,
    /// The same for the harness (login).
    pub harness_cpu_us_per_login: Option<f64>,
    /// Relay loss (lossy).
    pub loss_pct: Option<f64>,
    /// Open-loop rate, if any.
    pub rate: Option<u64>,
    /// Messages each sender kept in flight (closed loop).
    pub window: Option<usize>,
    /// What happened to the killed server's clients (failover).
    pub failover: Option<Failover>,
    /// The command line.
    pub command: String,
    /// The git revision the harness was built from (`git describe --always --dirty`).
    pub git_rev: String,
}

/// How a killed server's clients came back (the `failover` scenario).
#[derive(Debug, Clone, Serialize, Default)]
pub struct Failover {
    /// Clients that were on the killed server.
    pub victims: usize,
    /// Of those, clients connected again (to a live server) before the scenario gave up.
    pub recovered: usize,
    /// Re-logins the session token did (no password hash on the router).
    pub token_relogins: u64,
    /// Re-logins that needed the password.
    pub password_relogins: u64,
    /// From the kill to each victim noticing (heartbeat timeout).
    pub detect_us: Percentiles,
    /// From each victim noticing to its reconnect (a resume attempt on the dead server, which
    /// costs a whole connect timeout, then the re-login and its handshakes).
    pub recover_us: Percentiles,
    /// From the kill to the last reconnect of a victim that came back, seconds.
    pub last_back_s: f64,
}

fn progress_line(opts: &Options, line: String) {
    if opts.progress {
        eprintln!("{line}");
    }
}

/// Registers `n` users named `<prefix><i>` (password "bench-password").
async fn register(
    target: &Target,
    prefix: &str,
    n: usize,
    concurrency: usize,
) -> anyhow::Result<Vec<String>> {
    let config = ClientConfig::new(target.router_url.clone(), target.ca_pem.clone());
    let names: Vec<String> = (0..n).map(|i| format!("{prefix}{i}")).collect();
    let results: Vec<anyhow::Result<()>> = stream::iter(names.clone())
        .map(|name| {
            let config = config.clone();
            async move {
                match cim_client::register(&config, &name, "bench-password").await {
                    Ok(_) => Ok(()),
                    Err(e) if e.code() == Some("name_taken") => Ok(()),
                    Err(e) => Err(anyhow::Error::new(e).context(format!("registering {name}"))),
                }
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    results.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    Ok(names)
}

/// Client configurations sharing one endpoint per 250 clients.
fn configs(
    target: &Target,
    n: usize,
    overrides: &HashMap<std::net::SocketAddr, std::net::SocketAddr>,
) -> anyhow::Result<Vec<ClientConfig>> {
    let mut base = ClientConfig::new(target.router_url.clone(), target.ca_pem.clone());
    base.bind_addr = "127.0.0.1:0".parse()?;
    base.server_overrides = overrides.clone();
    let endpoints = (0..n.div_ceil(250).max(1))
        .map(|_| cim_client::endpoint(&base))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((0..n)
        .map(|i| {
            let mut c = base.clone();
            c.endpoint = Some(endpoints[i % endpoints.len()].clone());
            c
        })
        .collect())
}

/// Logs every name in, `concurrency` at a time, and records how long each login took (HTTPS
/// login, QUIC handshake and control-stream login, retries included).
async fn login_all(
    names: &[String],
    configs: Vec<ClientConfig>,
    concurrency: usize,
    report: &mut Report,
) -> anyhow::Result<Vec<(Client, Events)>> {
    let configs = &configs;
    timed_logins(
        names.len(),
        concurrency,
        |i| async move {
            let name = &names[i];
            // A handshake can outlast one connect timeout on a very lossy link: retry a little.
            // A router with its password hashing queue full answers `busy`: wait and retry.
            let mut attempt = 0;
            let mut busy = 0;
            loop {
                attempt += 1;
                match Client::login(
                    &configs[i],
                    name,
                    "bench-password",
                    LoginOptions { takeover: true },
                )
                .await
                {
                    Ok(pair) => return Ok(pair),
                    Err(e) if e.code() == Some("busy") && busy < 100 => {
                        busy += 1;
                        attempt -= 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) if attempt < 3 => {
                        tracing::debug!(name, error = %e, "login failed; retrying")
                    }
                    Err(e) => {
                        return Err(anyhow::Error::new(e).context(format!("logging in {name}")));
                    }
                }
            }
        },
        report,
    )
    .await
}

/// Runs `login(i)` for every `i` in `0..n`, `concurrency` at a time, records how long each
/// took in the report, and returns what they logged in, in index order.
pub(crate) async fn timed_logins<T, F, Fut>(
    n: usize,
    concurrency: usize,
    login: F,
    report: &mut Report,
) -> anyhow::Result<Vec<T>>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let logins: Vec<anyhow::Result<(usize, Duration, T)>> = stream::iter(0..n)
        .map(|i| {
            let login = login(i);
            async move {
                let started = Instant::now();
                let logged_in = login.await?;
                Ok((i, started.elapsed(), logged_in))
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let mut logins = logins.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    logins.sort_by_key(|(i, _, _)| *i);
    let mut took = Latencies::default();
    for (_, elapsed, _) in &logins {
        took.record(elapsed.as_micros() as u64);
    }
    report.login_latency_us = Some(took.percentiles());
    Ok(logins
        .into_iter()
        .map(|(_, _, logged_in)| logged_in)
        .collect())
}

/// Registers `n` users and logs them in (through the relays in `overrides`, if any).
async fn users(
    target: &Target,
    prefix: &str,
    n: usize,
    overrides: &HashMap<std::net::SocketAddr, std::net::SocketAddr>,
    opts: &Options,
    report: &mut Report,
) -> anyhow::Result<Vec<(Client, Events)>> {
    let names = register(target, prefix, n, opts.concurrency).await?;
    let configs = configs(target, n, overrides)?;
    let clients = login_all(&names, configs, opts.concurrency, report).await?;
    report.clients = clients.len();
    Ok(clients)
}

/// Makes `name` a group of every client: the first creates it, the others join, `concurrency`
/// at a time.
async fn form_group(
    clients: &[(Client, Events)],
    name: &str,
    concurrency: usize,
) -> anyhow::Result<()> {
    let Some(((owner, _), others)) = clients.split_first() else {
        return Ok(());
    };
    owner
        .create_group(name)
        .await
        .with_context(|| format!("creating group {name}"))?;
    stream::iter(others)
        .map(|(client, _)| client.join_group(name))
        .buffer_unordered(concurrency)
        .try_collect::<()>()
        .await
        .with_context(|| format!("joining group {name}"))
}

/// What one receiver saw.
#[derive(Default)]
struct Seen {
    latencies: Latencies,
    keys: Vec<(u32, u64)>,
    /// (send time, latency) of every delivery, with `--timeline` only.
    timeline: Vec<(u64, u64)>,
}

/// Runs a scenario against `target`.
pub async fn run(opts: &Options, target: &Target) -> anyhow::Result<Report> {
    let mut report = Report {
        scenario: opts.scenario.name().to_string(),
        rate: opts.rate,
        command: std::env::args().collect::<Vec<_>>().join(" "),
        git_rev: git_rev(),
        ..Default::default()
    };
    let prefix = format!("b{:x}", rand::random::<u32>());
    match opts.scenario {
        Scenario::Private | Scenario::Lossy => {
            let mut overrides = HashMap::new();
            let mut relays = Vec::new();
            if opts.scenario == Scenario::Lossy {
                anyhow::ensure!(
                    !target.servers.is_empty(),
                    "the lossy scenario needs the embedded target"
                );
                for addr in target.servers.values() {
                    let relay =
                        Relay::start(*addr, Impairments::lossy(opts.loss_pct / 100.0), opts.seed)
                            .await?;
                    overrides.insert(*addr, relay.addr);
                    relays.push(relay);
                }
                report.loss_pct = Some(opts.loss_pct);
            }
            let clients =
                users(target, &prefix, opts.clients, &overrides, opts, &mut report).await?;
            messaging(opts, target, clients, None, &mut report).await?;
            drop(relays);
        }
        Scenario::Group => {
            let no_relay = HashMap::new();
            let clients =
                users(target, &prefix, opts.members, &no_relay, opts, &mut report).await?;
            let group = if opts.broadcast {
                cim_client::BROADCAST_GROUP.to_string()
            } else {
                let name = format!("{prefix}-group");
                form_group(&clients, &name, opts.concurrency).await?;
                name
            };
            let senders = opts.senders.max(1);
            messaging(opts, target, clients, Some((senders, group)), &mut report).await?;
        }
        Scenario::Login => {
            let names = register(target, &prefix, opts.clients, opts.concurrency).await?;
            let configs = configs(target, opts.clients, &HashMap::new())?;
            let storm = StormClock::start(target);
            let clients = login_all(&names, configs, opts.concurrency, &mut report).await?;
            storm.finish(target, clients.len(), &mut report);
            report.clients = clients.len();
            close_all(clients).await;
        }
        Scenario::Failover => {
            let (victim, pid) = opts
                .kill
                .clone()
                .context("the failover scenario needs --kill SERVER_ID=PID")?;
            let no_relay = HashMap::new();
            let clients =
                users(target, &prefix, opts.clients, &no_relay, opts, &mut report).await?;
            let started = Instant::now();
            report.failover = Some(failover(opts, clients, &victim, pid).await?);
            report.duration_s = started.elapsed().as_secs_f64();
        }
        Scenario::FloorPrivate => crate::floor::private(opts, target, &mut report).await?,
        Scenario::FloorIdle => crate::floor::idle(opts, target, &mut report).await?,
        Scenario::FloorLogin => crate::floor::login(opts, target, &mut report).await?,
        Scenario::Idle => {
            let before = target
                .rss_bytes()
                .context("the idle scenario needs the embedded target (reads its /proc)")?;
            let names = register(target, &prefix, opts.connections, opts.concurrency).await?;
            let registered = target.rss_bytes().context("reading server memory")?;
            report.server_rss_bytes_per_account =
                Some(registered.saturating_sub(before) / opts.connections.max(1) as u64);
            let started = Instant::now();
            let clients = login_all(
                &names,
                configs(target, opts.connections, &HashMap::new())?,
                opts.concurrency,
                &mut report,
            )
            .await?;
            report.clients = clients.len();
            let after = settled_memory(target, before, clients.len(), &mut report).await?;
            report.duration_s = started.elapsed().as_secs_f64();
            progress_line(
                opts,
                format!(
                    "rss before {before} B, after registering {registered} B, after {after} B, \
                     {} connections",
                    clients.len()
                ),
            );
            close_all(clients).await;
        }
    }
    Ok(report)
}

/// The clocks at the start of a login storm.
pub(crate) struct StormClock {
    cpu: (Option<f64>, Option<f64>),
    started: Instant,
}

impl StormClock {
    /// Reads the target's and the harness's CPU time and the wall clock.
    pub(crate) fn start(target: &Target) -> Self {
        Self {
            cpu: (target.cpu_seconds(), process_cpu_seconds("self")),
            started: Instant::now(),
        }
    }

    /// Reports the storm's duration, its logins per second and the CPU time per login of the
    /// target and the harness, for `logins` logins since [`StormClock::start`].
    pub(crate) fn finish(self, target: &Target, logins: usize, report: &mut Report) {
        let elapsed = self.started.elapsed().as_secs_f64();
        let cpu = (target.cpu_seconds(), process_cpu_seconds("self"));
        report.cluster_cpu_us_per_login = cpu_us_per(self.cpu.0, cpu.0, logins as u64);
        report.harness_cpu_us_per_login = cpu_us_per(self.cpu.1, cpu.1, logins as u64);
        report.duration_s = elapsed;
        report.logins_per_sec = Some(logins as f64 / elapsed);
    }
}

/// Lets `connections` fresh connections settle (handshake buffers freed, first heartbeats
/// done), then reports the target's resident memory per connection since `before`. Returns
/// the reading.
pub(crate) async fn settled_memory(
    target: &Target,
    before: u64,
    connections: usize,
    report: &mut Report,
) -> anyhow::Result<u64> {
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = target.rss_bytes().context("reading server memory")?;
    report.server_rss_bytes_per_conn =
        Some(after.saturating_sub(before) / connections.max(1) as u64);
    Ok(after)
}

/// CPU microseconds per unit of work between two readings of a process's CPU seconds (`None`
/// when either reading is missing, as for an existing cluster's processes).
fn cpu_us_per(before: Option<f64>, after: Option<f64>, units: u64) -> Option<f64> {
    Some((after? - before?) * 1e6 / units.max(1) as f64)
}

/// Longest a failover victim may take to notice and come back before it counts as lost.
const FAILOVER_WAIT: Duration = Duration::from_secs(180);

/// Kills server `victim` (process `pid`) and follows its clients until each has reconnected.
async fn failover(
    opts: &Options,
    clients: Vec<(Client, Events)>,
    victim: &str,
    pid: u32,
) -> anyhow::Result<Failover> {
    let (victims, others): (Vec<_>, Vec<_>) = clients
        .into_iter()
        .partition(|(client, _)| client.info().server_id == victim);
    anyhow::ensure!(!victims.is_empty(), "no client is on server {victim}");
    progress_line(
        opts,
        format!(
            "killing {victim} (pid {pid}) with {} clients",
            victims.len()
        ),
    );
    let killed = Instant::now();
    let status = tokio::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .await?;
    anyhow::ensure!(status.success(), "kill -KILL {pid} failed");
    let followers: Vec<_> = victims
        .into_iter()
        .map(|(client, mut events)| {
            tokio::spawn(async move {
                let mut noticed = None;
                let outcome = tokio::time::timeout(FAILOVER_WAIT, async {
                    while let Some(event) = events.next().await {
                        match event {
                            Event::Disconnected(_) => {
                                noticed.get_or_insert_with(|| killed.elapsed());
                            }
                            Event::Reconnected(_) => return Some(killed.elapsed()),
                            _ => {}
                        }
                    }
                    None
                })
                .await;
                (client, noticed, outcome.ok().flatten())
            })
        })
        .collect();
    let mut result = Failover::default();
    let (mut detect, mut recover) = (Latencies::default(), Latencies::default());
    let mut last_back = Duration::ZERO;
    let mut victims = Vec::new();
    for follower in followers {
        let (client, noticed, back) = follower.await?;
        result.victims += 1;
        if let (Some(noticed), Some(back)) = (noticed, back) {
            result.recovered += 1;
            detect.record(noticed.as_micros() as u64);
            recover.record(back.saturating_sub(noticed).as_micros() as u64);
            last_back = last_back.max(back);
        }
        let stats = client.stats();
        result.token_relogins += stats.token_relogins;
        result.password_relogins += stats.relogins.saturating_sub(stats.token_relogins);
        victims.push(client);
    }
    result.detect_us = detect.percentiles();
    result.recover_us = recover.percentiles();
    result.last_back_s = last_back.as_secs_f64();
    for client in victims {
        client.close().await;
    }
    close_all(others).await;
    Ok(result)
}

async fn close_all(clients: Vec<(Client, Events)>) {
    for (client, _) in clients {
        client.close().await;
    }
}

/// One client as the messaging loop drives it: cim's [`Client`], or a bare QUIC client of the
/// quinn floor (`crate::floor`).
pub(crate) trait LoadClient: Send + Sync + 'static {
    /// Sends `body` to client number `peer` of the run (`None`: to the group everyone is in)
    /// and waits for the ack.
    fn send(
        &self,
        peer: Option<usize>,
        body: String,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// UDP datagrams sent plus received on the client's current connection (0 while it has
    /// none).
    fn datagrams(&self) -> u64;
}

/// Where one client's deliveries arrive, in the order the application sees them.
pub(crate) trait Deliveries: Send + 'static {
    /// The next delivered message body; `Some(None)` for an event that is not a message, `None`
    /// once the client is closed.
    fn next_body(&mut self) -> impl Future<Output = Option<Option<String>>> + Send;
}

/// A cim client of a run, with the user ids of every client of the run (peers by index) and,
/// in a group run, the group it sends to.
struct CimClient {
    client: Client,
    ids: Arc<[u64]>,
    group: Option<Arc<str>>,
}

impl LoadClient for CimClient {
    async fn send(&self, peer: Option<usize>, body: String) -> anyhow::Result<()> {
        match peer {
            None => {
                let group = self
                    .group
                    .as_deref()
                    .context("a group send in a private run")?;
                self.client.send_group(group, &body).await?
            }
            Some(peer) => self.client.send_private(self.ids[peer], &body).await?,
        };
        Ok(())
    }

    fn datagrams(&self) -> u64 {
        self.client
            .transport_stats()
            .map_or(0, |s| s.udp_tx.datagrams + s.udp_rx.datagrams)
    }
}

impl Deliveries for Events {
    async fn next_body(&mut self) -> Option<Option<String>> {
        match self.next().await? {
            Event::Message(m) => Some(Some(m.body)),
            _ => Some(None),
        }
    }
}

/// How long deliveries must stop coming before a run stops receiving.
const DRAIN_QUIET: Duration = Duration::from_millis(300);

/// A message the cluster acked.
struct Ack {
    key: MessageKey,
    /// Who it was sent to.
    audience: Audience,
    /// Send to ack.
    micros: u64,
}

/// The receiving side of a messaging run: a task per client recording what it sees until
/// the run stops.
pub(crate) struct Receiving {
    epoch: Instant,
    /// Keep every delivery's send time and latency (`--timeline`).
    timeline: bool,
    delivered: Arc<AtomicU64>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<(u32, Seen)>>,
}

impl Receiving {
    /// Records deliveries for `opts`: with `--timeline`, each one's send time and latency too.
    pub fn new(opts: &Options) -> Self {
        Self {
            epoch: Instant::now(),
            timeline: opts.timeline.is_some(),
            delivered: Arc::new(AtomicU64::new(0)),
            stop: watch::channel(false).0,
            tasks: Vec::new(),
        }
    }

    /// Records client number `index`'s deliveries from now on.
    pub fn add(&mut self, index: usize, mut deliveries: impl Deliveries) {
        let delivered = self.delivered.clone();
        let mut stop = self.stop.subscribe();
        let epoch = self.epoch;
        let timeline = self.timeline;
        self.tasks.push(tokio::spawn(async move {
            let mut seen = Seen::default();
            // One stop future for the whole run, not one built (and registered with the watch)
            // per event: the harness shares the cores with the cluster it measures.
            let stopped = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            tokio::pin!(stopped);
            loop {
                let body = tokio::select! {
                    biased;
                    b = deliveries.next_body() => b,
                    () = &mut stopped => break,
                };
                match body {
                    Some(Some(body)) => {
                        if let Some((sender, counter, sent_at)) = decode_body(&body) {
                            let now = epoch.elapsed().as_micros() as u64;
                            seen.latencies.record(now.saturating_sub(sent_at));
                            seen.keys.push((sender, counter));
                            if timeline {
                                seen.timeline.push((sent_at, now.saturating_sub(sent_at)));
                            }
                            delivered.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Some(None) => {}
                    None => break,
                }
            }
            (index as u32, seen)
        }));
    }
}

/// Sends for `opts.duration` (closed loop, or open loop at `opts.rate`), then drains and fills
/// in the report. With `group`, that many members send to that group (every client is in
/// it); otherwise every client sends private messages to random peers.
async fn messaging(
    opts: &Options,
    target: &Target,
    clients: Vec<(Client, Events)>,
    group: Option<(usize, String)>,
    report: &mut Report,
) -> anyhow::Result<()> {
    let ids: Arc<[u64]> = clients.iter().map(|(c, _)| c.info().user_id).collect();
    let (group_senders, group): (Option<usize>, Option<Arc<str>>) = group
        .map(|(senders, name)| (senders, Arc::from(name)))
        .unzip();
    let mut receiving = Receiving::new(opts);
    let mut senders = Vec::new();
    for (index, (client, events)) in clients.into_iter().enumerate() {
        receiving.add(index, events);
        senders.push(Arc::new(CimClient {
            client,
            ids: ids.clone(),
            group: group.clone(),
        }));
    }
    drive(
        opts,
        || target.cpu_seconds(),
        &senders,
        group_senders,
        receiving,
        report,
    )
    .await?;
    for client in senders {
        if let Ok(client) = Arc::try_unwrap(client) {
            client.client.close().await;
        }
    }
    Ok(())
}

/// The sending loops, the drain and the report of a messaging run: `clients` send (the first
/// `group_senders` of them to the group, or all of them to random peers) while `receiving`
/// records deliveries. `cluster_cpu` reads the CPU seconds of the system under test.
pub(crate) async fn drive<C: LoadClient>(
    opts: &Options,
    cluster_cpu: impl Fn() -> Option<f64>,
    clients: &[Arc<C>],
    group_senders: Option<usize>,
    receiving: Receiving,
    report: &mut Report,
) -> anyhow::Result<()> {
    report.window = opts.rate.is_none().then_some(opts.window);
    let epoch = receiving.epoch;
    let now_us = move || epoch.elapsed().as_micros() as u64;
    let peers = clients.len();
    let delivered = receiving.delivered.clone();
    let expected = Arc::new(AtomicU64::new(0));

    let sending = Arc::new(AtomicBool::new(true));
    // Each sending task keeps the acks it got and hands them over at the end: no lock per ack,
    // and no shared list that stalls the harness while it grows.
    let acked = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let send_one = {
        let acked = acked.clone();
        let errors = errors.clone();
        let expected = expected.clone();
        let size = opts.size;
        // `scheduled`: when an open-loop send was due (in microseconds since the epoch), so a
        // send the harness itself issued late counts its lateness in its latency.
        move |client: Arc<C>, index: u32, counter: u64, scheduled: Option<u64>| {
            let acked = acked.clone();
            let errors = errors.clone();
            let expected = expected.clone();
            async move {
                let started = scheduled.unwrap_or_else(now_us);
                let body = encode_body(index, counter, started, size);
                let peer = group_senders.is_none().then(|| {
                    let peer = rand::rng().random_range(0..peers);
                    if peer == index as usize {
                        (peer + 1) % peers
                    } else {
                        peer
                    }
                });
                let audience = match peer {
                    Some(peer) => Audience::One(peer as u32),
                    None => Audience::AllBut(index),
                };
                match client.send(peer, body).await {
                    Ok(()) => {
                        expected.fetch_add(audience.size(peers as u32), Ordering::Relaxed);
                        acked.fetch_add(1, Ordering::Relaxed);
                        Some(Ack {
                            key: (index, counter),
                            audience,
                            micros: now_us().saturating_sub(started),
                        })
                    }
                    Err(e) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(error = %e, "send failed");
                        None
                    }
                }
            }
        }
    };

    let active: Vec<(u32, Arc<C>)> = clients
        .iter()
        .enumerate()
        .take(group_senders.unwrap_or(usize::MAX))
        .map(|(i, c)| (i as u32, c.clone()))
        .collect();
    let datagrams_before = client_datagrams(clients);
    let cpu_before = (cluster_cpu(), process_cpu_seconds("self"));
    let started = Instant::now();
    let mut tasks = Vec::new();
    match opts.rate {
        None => {
            // `window` loops per sender, each with its own counters (lane, lane + window, ...).
            let window = opts.window as u64;
            for (index, client) in active {
                for lane in 0..window {
                    let sending = sending.clone();
                    let send_one = send_one.clone();
                    let client = client.clone();
                    tasks.push(tokio::spawn(async move {
                        let mut counter = lane;
                        let mut acks = Vec::new();
                        while sending.load(Ordering::Relaxed) {
                            acks.extend(send_one(client.clone(), index, counter, None).await);
                            counter += window;
                        }
                        Ok(acks)
                    }));
                }
            }
        }
        Some(rate) => {
            let sending = sending.clone();
            let send_one = send_one.clone();
            let duration = opts.duration;
            tasks.push(tokio::spawn(async move {
                let mut issued = 0u64;
                let mut counters = vec![0u64; active.len()];
                let mut tick = tokio::time::interval(Duration::from_millis(1));
                let begin = Instant::now();
                let begin_us = now_us();
                // Room for every send up front: a list of a quarter million handles doubling
                // would stall this loop.
                let sends = (rate as f64 * (duration.as_secs_f64() + 1.0)) as usize;
                let mut inflight = Vec::with_capacity(sends);
                while sending.load(Ordering::Relaxed) {
                    tick.tick().await;
                    let due = (begin.elapsed().as_secs_f64() * rate as f64) as u64;
                    while issued < due {
                        let slot = (issued as usize) % active.len();
                        let (index, client) = &active[slot];
                        let due_us = begin_us + issued * 1_000_000 / rate;
                        inflight.push(tokio::spawn(send_one(
                            client.clone(),
                            *index,
                            counters[slot],
                            Some(due_us),
                        )));
                        counters[slot] += 1;
                        issued += 1;
                    }
                }
                let mut acks = Vec::with_capacity(inflight.len());
                for task in inflight {
                    acks.extend(task.await?);
                }
                Ok::<_, tokio::task::JoinError>(acks)
            }));
        }
    }

    let progress = {
        let delivered = delivered.clone();
        let acked = acked.clone();
        let show = opts.progress;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                if show {
                    let sent = acked.load(Ordering::Relaxed);
                    eprintln!(
                        "  {:>5.1}s  sent {sent:>9}  delivered {:>9}",
                        started.elapsed().as_secs_f64(),
                        delivered.load(Ordering::Relaxed)
                    );
                }
            }
        })
    };
    tokio::time::sleep(opts.duration).await;
    sending.store(false, Ordering::Relaxed);
    // A sending task that panicked would take its acks with it: fail the run instead.
    let mut acks = Vec::new();
    for task in tasks {
        acks.extend(task.await??);
    }
    let send_window = started.elapsed();
    // Drain: wait until every acked delivery arrived (or give up: those are lost).
    let drain_deadline = Instant::now() + opts.drain_limit;
    while delivered.load(Ordering::Relaxed) < expected.load(Ordering::Relaxed)
        && Instant::now() < drain_deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    let cpu_after = (cluster_cpu(), process_cpu_seconds("self"));
    let datagrams: u64 = client_datagrams(clients)
        .into_iter()
        .zip(datagrams_before)
        // A client that reconnected meanwhile counts from its new connection only.
        .map(|(after, before)| after.checked_sub(before).unwrap_or(after))
        .sum();
    progress.abort();
    // Then on until nothing more comes for a moment: the count above includes duplicates
    // and deliveries of unacked sends, so it can be reached early, and a late duplicate must
    // still be seen.
    let mut last = delivered.load(Ordering::Relaxed);
    while Instant::now() < drain_deadline {
        tokio::time::sleep(DRAIN_QUIET).await;
        let now = delivered.load(Ordering::Relaxed);
        if now == last {
            break;
        }
        last = now;
    }
    let _ = receiving.stop.send(true);

    let mut tracker = Tracker::new(peers as u32);
    let mut send_ack = Latencies::default();
    for ack in acks {
        tracker.acked(ack.key, ack.audience);
        send_ack.record(ack.micros);
    }
    let mut latencies = Latencies::default();
    let mut timeline = Vec::new();
    for receiver in receiving.tasks {
        let (index, seen) = receiver.await?;
        timeline.extend(seen.timeline);
        for key in seen.keys {
            tracker.received(index, key);
        }
        latencies.merge(seen.latencies);
    }
    let summary = tracker.summary();
    report.duration_s = send_window.as_secs_f64();
    report.sent = summary.sent;
    report.delivered = summary.delivered;
    report.lost = summary.lost;
    report.duplicated = summary.duplicated;
    report.misdelivered = summary.misdelivered;
    report.send_errors = errors.load(Ordering::Relaxed);
    // Throughput over the whole time deliveries took, sending plus drain.
    report.msgs_per_sec = summary.delivered as f64 / elapsed.as_secs_f64();
    report.client_datagrams_per_msg = Some(datagrams as f64 / summary.delivered.max(1) as f64);
    report.cluster_cpu_us_per_msg = cpu_us_per(cpu_before.0, cpu_after.0, summary.delivered);
    report.harness_cpu_us_per_msg = cpu_us_per(cpu_before.1, cpu_after.1, summary.delivered);
    report.latency_us = latencies.percentiles();
    report.send_ack_latency_us = send_ack.percentiles();
    if let Some(path) = &opts.timeline {
        write_timeline(path, timeline)?;
    }
    Ok(())
}

/// UDP datagrams sent plus received on each client's current connection.
fn client_datagrams<C: LoadClient>(clients: &[Arc<C>]) -> Vec<u64> {
    clients.iter().map(|c| c.datagrams()).collect()
}

/// Writes latency by send time, in windows of [`TIMELINE_WINDOW_US`], as CSV to `path`.
fn write_timeline(path: &std::path::Path, samples: Vec<(u64, u64)>) -> anyhow::Result<()> {
    use std::fmt::Write as _;
    let mut csv = String::from("sent_s,deliveries,p50_us,p99_us,max_us\n");
    for w in timeline_windows(samples, TIMELINE_WINDOW_US) {
        let p = w.latencies.percentiles();
        let start = w.start_us as f64 / 1e6;
        let count = w.latencies.len();
        let _ = writeln!(csv, "{start:.1},{count},{},{},{}", p.p50, p.p99, p.max);
    }
    std::fs::write(path, csv).with_context(|| format!("writing {}", path.display()))
}

/// The revision this harness was built from (see build.rs).
fn git_rev() -> String {
    env!("CIM_BUILD_REV").to_string()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    /// What the fake cluster does wrong, to the message of a given number (counted over all
    /// sends of the run).
    #[derive(Clone, Copy)]
    enum Fault {
        Lose(u64),
        Duplicate(u64),
        /// Delivered to its sender instead.
        Misdirect(u64),
    }

    /// A client of a fake cluster made of channels: every send is acked and delivered to its
    /// recipients, except as its fault says.
    struct FakeClient {
        index: usize,
        inboxes: Arc<Vec<mpsc::UnboundedSender<String>>>,
        sent: Arc<AtomicU64>,
        fault: Fault,
    }

    impl LoadClient for FakeClient {
        async fn send(&self, peer: Option<usize>, body: String) -> anyhow::Result<()> {
            let n = self.sent.fetch_add(1, Ordering::SeqCst);
            let clients = self.inboxes.len();
            let recipients: Vec<usize> = match peer {
                Some(peer) => vec![peer],
                None => (0..clients).filter(|&i| i != self.index).collect(),
            };
            for (i, &to) in recipients.iter().enumerate() {
                // Only the message's first recipient suffers the fault.
                let faulty = i == 0;
                match self.fault {
                    Fault::Lose(k) if faulty && n == k => continue,
                    Fault::Duplicate(k) if faulty && n == k => {
                        let _ = self.inboxes[to].send(body.clone());
                    }
                    Fault::Misdirect(k) if faulty && n == k => {
                        // To its own sender: a client it is never for.
                        let _ = self.inboxes[self.index].send(body.clone());
                        continue;
                    }
                    _ => {}
                }
                let _ = self.inboxes[to].send(body.clone());
            }
            Ok(())
        }

        fn datagrams(&self) -> u64 {
            0
        }
    }

    fn options(scenario: Scenario) -> Options {
        Options {
            scenario,
            clients: 4,
            duration: Duration::from_millis(300),
            rate: Some(1000),
            window: 1,
            members: 4,
            senders: 2,
            broadcast: false,
            connections: 0,
            loss_pct: 0.0,
            size: 64,
            concurrency: 1,
            seed: 1,
            progress: false,
            kill: None,
            timeline: None,
            drain_limit: Duration::from_secs(1),
        }
    }

    /// Runs `drive` over four fake clients with `fault`; a group run when `group`.
    async fn run_with(fault: Fault, group: bool) -> Report {
        let scenario = if group {
            Scenario::Group
        } else {
            Scenario::Private
        };
        let opts = options(scenario);
        let mut receiving = Receiving::new(&opts);
        let (senders, receivers): (Vec<_>, Vec<_>) =
            (0..4).map(|_| mpsc::unbounded_channel::<String>()).unzip();
        for (index, receiver) in receivers.into_iter().enumerate() {
            receiving.add(index, receiver);
        }
        let inboxes = Arc::new(senders);
        let sent = Arc::new(AtomicU64::new(0));
        let clients: Vec<Arc<FakeClient>> = (0..4)
            .map(|index| {
                Arc::new(FakeClient {
                    index,
                    inboxes: inboxes.clone(),
                    sent: sent.clone(),
                    fault,
                })
            })
            .collect();
        let mut report = Report::default();
        let group_senders = group.then_some(opts.senders);
        drive(
            &opts,
            || None,
            &clients,
            group_senders,
            receiving,
            &mut report,
        )
        .await
        .unwrap();
        assert!(report.sent > 50, "{report:?}");
        report
    }

    fn faults(report: &Report) -> (u64, u64, u64) {
        (report.lost, report.duplicated, report.misdelivered)
    }

    /// The harness sees what a cluster did wrong, end to end: from the sends through the
    /// receiving tasks and the drain to the report.
    #[tokio::test]
    async fn a_run_reports_what_the_cluster_lost_repeated_or_misdirected() {
        for group in [false, true] {
            assert_eq!(faults(&run_with(Fault::Lose(20), group).await), (1, 0, 0));
            assert_eq!(
                faults(&run_with(Fault::Duplicate(20), group).await),
                (0, 1, 0)
            );
            assert_eq!(
                faults(&run_with(Fault::Misdirect(20), group).await),
                (1, 0, 1),
                "group {group}"
            );
            // A fault past the end of the run changes nothing.
            assert_eq!(
                faults(&run_with(Fault::Lose(u64::MAX), group).await),
                (0, 0, 0)
            );
        }
    }
}
