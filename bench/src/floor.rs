//! The quinn floor: cim's client traffic shapes on bare quinn and rustls, with cim's own
//! transport settings and TLS configurations but none of cim in between (no router hop, no
//! store, no tokens, no protobuf, no HTTP). A cim figure read against the floor's on the same
//! machine says how much of it the transport and the traffic shape cost, and how much cim does.
//!
//! The floor server runs in a process of its own (`cim-bench floor-server`, started by
//! [`crate::target::Target::floor`]) so that its CPU time and memory are read from /proc as
//! the embedded cluster's are. What it does per message mirrors a cim server's client side:
//! - a client's message arrives on a stream of its own (`to` index + body, then FIN); the
//!   server acks it on that stream at once (cim acks once the message is stored) and opens a
//!   stream to the recipient with the body; the recipient acks on that stream;
//! - every client keeps a control stream open, as cim clients do, and busy clients get the
//!   wider stream allowance (`StreamAllowance`);
//! - a "login" is a TLS handshake over TCP with one small request and reply (cim's HTTPS
//!   login, without HTTP, Argon2 or the store), then a QUIC handshake and one exchange on the
//!   control stream (cim's control-stream login, without the token check or the route).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, ensure};
use cim_core::tls;
use cim_core::transport::{self, CLIENT_STREAMS_BUSY, Link, StreamAllowance};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::run::{
    Deliveries, LoadClient, Options, Receiving, Report, StormClock, drive, settled_memory,
    timed_logins,
};
use crate::target::Target;

/// ALPN of the floor's QUIC and TLS connections.
const ALPN: &[u8] = b"cim-floor/1";
/// Largest message or login request the floor accepts.
const MAX_MESSAGE: usize = 64 * 1024;
/// Bytes of a login reply: about what cim's grant (a token, a server address) takes as JSON.
const LOGIN_REPLY_BYTES: usize = 300;

/// Connections by client index.
type Peers = Arc<Mutex<HashMap<u32, quinn::Connection>>>;

/// Runs the floor server with the certificates in `certs` until the process is killed. Prints
/// `floor: QUIC_ADDR TCP_ADDR` once it listens.
pub async fn serve(certs: &Path) -> anyhow::Result<()> {
    let paths = cim_certs::CertPaths::in_dir(certs);
    let quic_tls = tls::server_config(&paths.server_cert(), &paths.server_key(), &[ALPN], None)?;
    let endpoint =
        transport::server_endpoint("127.0.0.1:0".parse()?, quic_tls.clone(), Link::Client)?;
    let tcp = TcpListener::bind("127.0.0.1:0").await?;
    println!("floor: {} {}", endpoint.local_addr()?, tcp.local_addr()?);
    tokio::spawn(serve_tcp(tcp, TlsAcceptor::from(Arc::new(quic_tls))));
    let peers = Peers::default();
    let acks = Arc::new(AtomicU64::new(0));
    while let Some(incoming) = endpoint.accept().await {
        let (peers, acks) = (peers.clone(), acks.clone());
        tokio::spawn(async move {
            if let Err(e) = serve_client(incoming, peers, acks).await {
                tracing::debug!(error = %e, "floor client ended");
            }
        });
    }
    Ok(())
}

/// Answers each TLS-over-TCP "login" with a reply of [`LOGIN_REPLY_BYTES`].
async fn serve_tcp(listener: TcpListener, acceptor: TlsAcceptor) {
    while let Ok((tcp, _)) = listener.accept().await {
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let login = async {
                tcp.set_nodelay(true)?;
                let mut tls = acceptor.accept(tcp).await?;
                read_sized(&mut tls).await?;
                write_sized(&mut tls, &[b'r'; LOGIN_REPLY_BYTES]).await?;
                tls.shutdown().await?;
                anyhow::Ok(())
            };
            if let Err(e) = login.await {
                tracing::debug!(error = %e, "floor login failed");
            }
        });
    }
}

/// A 4-byte big-endian length and that many bytes.
async fn write_sized<W: AsyncWriteExt + Unpin>(w: &mut W, bytes: &[u8]) -> anyhow::Result<()> {
    w.write_all(&(bytes.len() as u32).to_be_bytes()).await?;
    w.write_all(bytes).await?;
    w.flush().await?;
    Ok(())
}

/// Reads what [`write_sized`] wrote.
async fn read_sized<R: AsyncReadExt + Unpin>(r: &mut R) -> anyhow::Result<Vec<u8>> {
    let len = r.read_u32().await? as usize;
    ensure!(len <= MAX_MESSAGE, "{len} bytes is too large");
    let mut bytes = vec![0; len];
    r.read_exact(&mut bytes).await?;
    Ok(bytes)
}

/// One client connection: its index on the control stream, then a stream per message.
async fn serve_client(
    incoming: quinn::Incoming,
    peers: Peers,
    acks: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let conn = incoming.await?;
    let (mut control_send, mut control_recv) = conn.accept_bi().await?;
    let index = control_recv.read_u32().await?;
    peers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(index, conn.clone());
    control_send.write_all(&[1]).await?;
    let mut allowance = StreamAllowance::default();
    while let Ok((send, recv)) = conn.accept_bi().await {
        if allowance.on_stream(Instant::now()) {
            conn.set_max_concurrent_bi_streams(quinn::VarInt::from_u32(CLIENT_STREAMS_BUSY));
        }
        let (peers, acks) = (peers.clone(), acks.clone());
        tokio::spawn(async move {
            if let Err(e) = forward(send, recv, &peers, &acks).await {
                tracing::debug!(error = %e, "floor message failed");
            }
        });
    }
    let mut peers = peers.lock().unwrap_or_else(|p| p.into_inner());
    if peers.get(&index).map(|c| c.stable_id()) == Some(conn.stable_id()) {
        peers.remove(&index);
    }
    Ok(())
}

/// Acks one message and delivers it on a stream to its recipient.
async fn forward(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    peers: &Peers,
    acks: &AtomicU64,
) -> anyhow::Result<()> {
    let message = recv.read_to_end(MAX_MESSAGE).await?;
    ensure!(message.len() >= 4, "message without a recipient");
    let to = u32::from_be_bytes([message[0], message[1], message[2], message[3]]);
    let recipient = peers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&to)
        .cloned()
        .context("unknown recipient")?;
    let ack = acks.fetch_add(1, Ordering::Relaxed);
    send.write_all(&ack.to_be_bytes()).await?;
    send.finish()?;
    let (mut delivery, mut delivery_ack) = recipient.open_bi().await?;
    delivery.write_all(&message[4..]).await?;
    delivery.finish()?;
    delivery_ack.read_to_end(16).await?;
    Ok(())
}

/// A bare QUIC client of the floor.
pub struct FloorClient {
    conn: quinn::Connection,
    /// Kept open for the connection's life, as cim's control stream is.
    _control: (quinn::SendStream, quinn::RecvStream),
}

impl FloorClient {
    /// Connects as client number `index` and hands its deliveries to the returned channel.
    async fn connect(
        endpoint: &quinn::Endpoint,
        server: SocketAddr,
        index: u32,
    ) -> anyhow::Result<(Self, mpsc::UnboundedReceiver<String>)> {
        let conn = endpoint
            .connect(server, &transport::server_name(&server))?
            .await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(&index.to_be_bytes()).await?;
        let mut ok = [0; 1];
        recv.read_exact(&mut ok).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(accept_deliveries(conn.clone(), tx));
        let control = (send, recv);
        Ok((
            Self {
                conn,
                _control: control,
            },
            rx,
        ))
    }

    fn close(&self) {
        self.conn.close(0u32.into(), b"done");
    }
}

/// Reads each delivery stream, passes the body on and acks it.
async fn accept_deliveries(conn: quinn::Connection, tx: mpsc::UnboundedSender<String>) {
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        let tx = tx.clone();
        tokio::spawn(async move {
            let Ok(body) = recv.read_to_end(MAX_MESSAGE).await else {
                return;
            };
            let Ok(body) = String::from_utf8(body) else {
                return;
            };
            if tx.send(body).is_ok() && send.write_all(&[1]).await.is_ok() {
                let _ = send.finish();
            }
        });
    }
}

impl LoadClient for FloorClient {
    async fn send(&self, peer: Option<usize>, body: String) -> anyhow::Result<()> {
        let to = peer.context("the floor has no groups")? as u32;
        let (mut send, mut recv) = self.conn.open_bi().await?;
        let mut message = Vec::with_capacity(4 + body.len());
        message.extend_from_slice(&to.to_be_bytes());
        message.extend_from_slice(body.as_bytes());
        send.write_all(&message).await?;
        send.finish()?;
        let ack = recv.read_to_end(16).await?;
        ensure!(ack.len() == 8, "ack of {} bytes", ack.len());
        Ok(())
    }

    fn datagrams(&self) -> u64 {
        let stats = self.conn.stats();
        stats.udp_tx.datagrams + stats.udp_rx.datagrams
    }
}

impl Deliveries for mpsc::UnboundedReceiver<String> {
    async fn next_body(&mut self) -> Option<Option<String>> {
        self.recv().await.map(Some)
    }
}

/// The floor's QUIC and TCP addresses in `target`.
fn addrs(target: &Target) -> anyhow::Result<(SocketAddr, SocketAddr)> {
    let quic = target.servers.get("quic").context("not a floor target")?;
    let tcp = target.servers.get("tcp").context("not a floor target")?;
    Ok((*quic, *tcp))
}

/// Client endpoints as cim's clients make them, one per 250 clients (as the bench shares
/// them for cim).
fn endpoints(target: &Target, n: usize) -> anyhow::Result<Vec<quinn::Endpoint>> {
    (0..n.div_ceil(250).max(1))
        .map(|_| {
            let roots = tls::roots_from_pem(&target.ca_pem)?;
            let tls = tls::client_config(roots, &[ALPN], None)?;
            let quic = transport::client_config(tls, Link::Client)?;
            Ok(transport::client_endpoint("127.0.0.1:0".parse()?, quic)?)
        })
        .collect()
}

/// Logs `n` clients in, `concurrency` at a time: each a TLS handshake over TCP with one
/// exchange (when `with_tls`), then a QUIC connection. Records how long each took.
async fn log_in(
    target: &Target,
    n: usize,
    concurrency: usize,
    with_tls: bool,
    report: &mut Report,
) -> anyhow::Result<Vec<(FloorClient, mpsc::UnboundedReceiver<String>)>> {
    let (quic, tcp) = addrs(target)?;
    let endpoints = endpoints(target, n)?;
    let endpoints = &endpoints;
    let clients = timed_logins(
        n,
        concurrency,
        |i| async move {
            if with_tls {
                tls_login(&target.ca_pem, tcp).await?;
            }
            FloorClient::connect(&endpoints[i % endpoints.len()], quic, i as u32)
                .await
                .with_context(|| format!("connecting floor client {i}"))
        },
        report,
    )
    .await?;
    report.clients = clients.len();
    Ok(clients)
}

/// cim's HTTPS login without HTTP: a TLS handshake with a fresh client configuration (as
/// each cim login makes one), a request about the size of cim's and the reply.
async fn tls_login(ca_pem: &[u8], tcp: SocketAddr) -> anyhow::Result<()> {
    let roots = tls::roots_from_pem(ca_pem)?;
    let config = tls::client_config(roots, &[ALPN], None)?;
    let stream = TcpStream::connect(tcp).await?;
    stream.set_nodelay(true)?;
    let name = ServerName::try_from(transport::server_name(&tcp))?;
    let mut tls = TlsConnector::from(Arc::new(config))
        .connect(name, stream)
        .await?;
    write_sized(&mut tls, &[b'q'; 180]).await?;
    let reply = read_sized(&mut tls).await?;
    ensure!(reply.len() == LOGIN_REPLY_BYTES, "short login reply");
    Ok(())
}

fn close_all(clients: &[(FloorClient, mpsc::UnboundedReceiver<String>)]) {
    for (client, _) in clients {
        client.close();
    }
}

/// `floor-private`: the `private` scenario on the floor.
pub async fn private(opts: &Options, target: &Target, report: &mut Report) -> anyhow::Result<()> {
    let clients = log_in(target, opts.clients, opts.concurrency, false, report).await?;
    let mut receiving = Receiving::new(opts);
    let mut senders = Vec::new();
    for (index, (client, deliveries)) in clients.into_iter().enumerate() {
        receiving.add(index, deliveries);
        senders.push(Arc::new(client));
    }
    drive(
        opts,
        || target.cpu_seconds(),
        &senders,
        None,
        receiving,
        report,
    )
    .await?;
    for client in &senders {
        client.close();
    }
    Ok(())
}

/// `floor-idle`: server memory per idle connection on the floor, each logged in as
/// `floor-login` does (TLS over TCP, then QUIC), as cim's idle clients log in over HTTPS first.
pub async fn idle(opts: &Options, target: &Target, report: &mut Report) -> anyhow::Result<()> {
    let before = target.rss_bytes().context("reading the floor's memory")?;
    let started = Instant::now();
    let clients = log_in(target, opts.connections, opts.concurrency, true, report).await?;
    settled_memory(target, before, clients.len(), report).await?;
    report.duration_s = started.elapsed().as_secs_f64();
    close_all(&clients);
    Ok(())
}

/// `floor-login`: the `login` storm on the floor.
pub async fn login(opts: &Options, target: &Target, report: &mut Report) -> anyhow::Result<()> {
    let storm = StormClock::start(target);
    let clients = log_in(target, opts.clients, opts.concurrency, true, report).await?;
    storm.finish(target, clients.len(), report);
    close_all(&clients);
    Ok(())
}
