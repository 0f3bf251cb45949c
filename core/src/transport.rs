//! QUIC endpoints with cim's transport settings: enlarged UDP socket buffers, small
//! per-connection stream limits on client links (every allowed stream costs memory up front)
//! that widen once a client sends quickly, a short ack delay asked of clients and a 100 ms
//! initial round-trip estimate, no path MTU probing on client links, wider limits on router <->
//! server links, and the keep-alive / idle timeouts.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{EndpointConfig, IdleTimeout, TokioRuntime, TransportConfig, VarInt};
use socket2::{Domain, Protocol, Socket, Type};

/// UDP socket buffer size requested for every endpoint (the kernel may cap it).
pub const UDP_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// Message streams a client may have open at once while it is quiet. quinn sets aside state
/// for every stream the peer may open (128 instead of 16 cost 11 KB more per idle connection),
/// and grants fresh credit (a MAX_STREAMS frame, which the peer acks) once more than an eighth
/// of the limit is used up: every third stream at 16.
pub const CLIENT_STREAMS_QUIET: u32 = 16;
/// Message streams a busy client may have open at once (see [`StreamAllowance`]), and the
/// streams a client lets its server open (its own memory pays for those): credit every 17th
/// stream. Cut client datagrams per private message by 12% under `cim-bench private`.
pub const CLIENT_STREAMS_BUSY: u32 = 128;
/// How soon a server asks its clients to acknowledge what it sends (QUIC's ACK_FREQUENCY
/// extension; by default a peer may wait 25 ms). A lost packet with nothing sent after it is
/// only resent at the sender's probe timeout, which includes the peer's ack delay, so on a
/// low-latency lossy path this is most of the time a lost delivery waits: in `cim-bench lossy`
/// at 10% loss it cut p99 by about a fifth. Clients ack a delivery with data of their own at
/// once anyway, so it adds few datagrams (2-4% there). The other direction (clients asking
/// for 5 ms) cut p99 further but made the server ack every delivery ack on its own: 12% more
/// datagrams per private message at full speed.
///
/// The request rides in the server's first packets; quinn 0.11 does not send it again if that
/// packet is lost, and such a client keeps the 25 ms default for the connection (the measured
/// gain includes this).
pub const CLIENT_ACK_DELAY: Duration = Duration::from_millis(5);
/// Round-trip time assumed on a client link before the first sample. QUIC's default is 333 ms,
/// and the handshake's probe timeout is three times the estimate, so a lost first handshake
/// packet was resent only after a second: in `cim-bench lossy` at 5% loss this cut the p99
/// login time from 1.1-1.2 s to 0.4-0.5 s. When the answer takes longer than about 300 ms the
/// first packet is now sent twice (1,200 bytes).
pub const CLIENT_INITIAL_RTT: Duration = Duration::from_millis(100);
/// Streams within one second that make a client busy.
const BUSY_STREAMS_PER_SEC: u32 = 8;

/// Decides when a client's stream allowance widens from [`CLIENT_STREAMS_QUIET`] to
/// [`CLIENT_STREAMS_BUSY`]: at its [`BUSY_STREAMS_PER_SEC`]th stream within one second of the
/// first stream of a counting window (windows are fixed, not sliding). It stays wide for the
/// rest of the connection (quinn keeps the memory anyway).
#[derive(Debug, Default)]
pub struct StreamAllowance {
    window_start: Option<Instant>,
    in_window: u32,
    widened: bool,
}

impl StreamAllowance {
    /// Counts a new stream opened at `now`; true exactly once, when the allowance should widen.
    pub fn on_stream(&mut self, now: Instant) -> bool {
        if self.widened {
            return false;
        }
        match self.window_start {
            Some(start) if now.saturating_duration_since(start) < Duration::from_secs(1) => {
                self.in_window += 1;
            }
            _ => {
                self.window_start = Some(now);
                self.in_window = 1;
            }
        }
        self.widened = self.in_window >= BUSY_STREAMS_PER_SEC;
        self.widened
    }
}

/// Why an endpoint could not be created.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// Socket creation or binding failed.
    #[error("binding {addr}: {source}")]
    Bind {
        /// Address requested.
        addr: SocketAddr,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The rustls configuration cannot be used for QUIC (for example, no TLS 1.3).
    #[error("tls configuration unusable for quic: {0}")]
    Crypto(String),
}

/// Which link a transport configuration is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// Client <-> server: one control stream plus a few message streams in flight.
    Client,
    /// Router <-> server: many concurrent pushes and forwards.
    Internal,
}

/// Timeouts and limits of a link, chosen for the link's users, as the `side` accepting
/// (`Server`) or dialling (`Client`) sets them.
///
/// Client links are tuned for mobile networks: a 5 s keep-alive keeps NAT bindings warm and
/// lets a dead path show up quickly; 30 s of silence ends the connection.
pub fn transport_config(link: Link, side: quinn::Side) -> TransportConfig {
    let mut t = TransportConfig::default();
    match link {
        Link::Client => {
            match side {
                // Streams a client may open; widened for busy clients (`StreamAllowance`).
                quinn::Side::Server => {
                    t.max_concurrent_bidi_streams(VarInt::from_u32(CLIENT_STREAMS_QUIET));
                    let mut acks = quinn::AckFrequencyConfig::default();
                    acks.max_ack_delay(Some(CLIENT_ACK_DELAY));
                    // Stated, not left to the default: with the extension on, a client acks a
                    // gap in packet numbers at once only when it lets the server declare a loss
                    // (without it, at any gap). Acking every gap at once (1) was no faster
                    // through the lossy relay and sent 1-2% more datagrams.
                    acks.reordering_threshold(VarInt::from_u32(2));
                    t.ack_frequency_config(Some(acks));
                }
                // The server opens a stream per delivery batch; the allowance costs the
                // client's memory, not the server's.
                quinn::Side::Client => {
                    t.max_concurrent_bidi_streams(VarInt::from_u32(CLIENT_STREAMS_BUSY));
                }
            }
            t.max_concurrent_uni_streams(VarInt::from_u32(0));
            t.stream_receive_window(VarInt::from_u32(128 * 1024));
            t.receive_window(VarInt::from_u32(512 * 1024));
            t.send_window(512 * 1024);
            t.keep_alive_interval(Some(Duration::from_secs(5)));
            t.max_idle_timeout(Some(IdleTimeout::from(VarInt::from_u32(30_000))));
            t.initial_rtt(CLIENT_INITIAL_RTT);
            // No path MTU discovery: datagrams stay at QUIC's 1,200-byte minimum. quinn probes
            // each direction right after the handshake (a PING padded to 1,326, 1,389, 1,420 and
            // 1,452 bytes, each acked), and the receiver walks padding a byte at a time. An
            // instant message fits in 1,200 bytes, so on client links the probes bought nothing
            // and cost every login and reconnect eight full-size datagrams and their acks:
            // airtime and data on a mobile link, CPU on both ends in a login storm. Router <->
            // server links, which carry batches, keep discovery.
            t.mtu_discovery_config(None);
        }
        Link::Internal => {
            t.max_concurrent_bidi_streams(VarInt::from_u32(4096));
            t.max_concurrent_uni_streams(VarInt::from_u32(0));
            t.stream_receive_window(VarInt::from_u32(1024 * 1024));
            t.receive_window(VarInt::from_u32(16 * 1024 * 1024));
            t.send_window(16 * 1024 * 1024);
            // Inside the cluster a dead peer should be noticed within a few seconds.
            t.keep_alive_interval(Some(Duration::from_secs(1)));
            t.max_idle_timeout(Some(IdleTimeout::from(VarInt::from_u32(4_000))));
        }
    }
    t
}

/// A non-blocking UDP socket bound to `addr` with enlarged buffers.
pub fn udp_socket(addr: SocketAddr) -> Result<std::net::UdpSocket, EndpointError> {
    let bind_err = |source| EndpointError::Bind { addr, source };
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
        .map_err(bind_err)?;
    // Best effort: an unprivileged process may be capped by net.core.*mem_max.
    if let Err(e) = socket.set_recv_buffer_size(UDP_BUFFER_BYTES) {
        tracing::debug!(error = %e, "could not enlarge udp receive buffer");
    }
    if let Err(e) = socket.set_send_buffer_size(UDP_BUFFER_BYTES) {
        tracing::debug!(error = %e, "could not enlarge udp send buffer");
    }
    socket.bind(&addr.into()).map_err(bind_err)?;
    socket.set_nonblocking(true).map_err(bind_err)?;
    Ok(socket.into())
}

/// A QUIC endpoint that accepts connections with `tls` on `addr`.
pub fn server_endpoint(
    addr: SocketAddr,
    tls: rustls::ServerConfig,
    link: Link,
) -> Result<quinn::Endpoint, EndpointError> {
    let crypto =
        QuicServerConfig::try_from(tls).map_err(|e| EndpointError::Crypto(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config(link, quinn::Side::Server)));
    let socket = udp_socket(addr)?;
    quinn::Endpoint::new(
        EndpointConfig::default(),
        Some(config),
        socket,
        Arc::new(TokioRuntime),
    )
    .map_err(|source| EndpointError::Bind { addr, source })
}

/// A QUIC client configuration from a rustls client configuration.
pub fn client_config(
    tls: rustls::ClientConfig,
    link: Link,
) -> Result<quinn::ClientConfig, EndpointError> {
    let crypto =
        QuicClientConfig::try_from(tls).map_err(|e| EndpointError::Crypto(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config(link, quinn::Side::Client)));
    Ok(config)
}

/// A QUIC endpoint that only dials out, bound to `addr` (use port 0).
pub fn client_endpoint(
    addr: SocketAddr,
    config: quinn::ClientConfig,
) -> Result<quinn::Endpoint, EndpointError> {
    let socket = udp_socket(addr)?;
    let mut endpoint = quinn::Endpoint::new(
        EndpointConfig::default(),
        None,
        socket,
        Arc::new(TokioRuntime),
    )
    .map_err(|source| EndpointError::Bind { addr, source })?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

/// Why a request/reply exchange on one stream failed.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// The connection is gone.
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// The stream was closed under us.
    #[error("stream: {0}")]
    Closed(#[from] quinn::ClosedStream),
    /// A frame could not be written or read.
    #[error("frame: {0}")]
    Frame(#[from] cim_proto::FrameError),
}

/// Opens a bidirectional stream, sends `request` as one frame, finishes the stream, and reads
/// one reply frame of at most `max_frame` bytes.
pub async fn exchange<Q, R>(
    conn: &quinn::Connection,
    request: &Q,
    max_frame: usize,
) -> Result<R, ExchangeError>
where
    Q: cim_proto::ProstMessage,
    R: cim_proto::ProstMessage + Default,
{
    let (mut send, mut recv) = conn.open_bi().await?;
    cim_proto::write_frame(&mut send, request, max_frame).await?;
    send.finish()?;
    Ok(read_only_frame(&mut recv, max_frame).await?)
}

/// Reads the one frame a request or reply stream carries, then takes the stream's end if it
/// has already arrived (it usually rides with the frame). quinn answers a receive stream that
/// is dropped before its end was read with a STOP_SENDING even when the FIN is in: one more
/// frame, and one more ack, per message in each direction. Only for streams that carry one
/// frame: on a stream with more to come it would swallow a byte of the next frame.
pub async fn read_only_frame<M>(
    recv: &mut quinn::RecvStream,
    max_frame: usize,
) -> Result<M, cim_proto::FrameError>
where
    M: cim_proto::ProstMessage + Default,
{
    let message = cim_proto::read_required(recv, max_frame).await?;
    take_end(recv);
    Ok(message)
}

/// Polls `recv` once for its end without waiting. When the end is there quinn records the
/// stream as fully read; otherwise (trailing data, or the FIN still in flight) dropping the
/// stream stops it as before. Cheap to repeat: a handler that held the stream across other
/// work calls it again before dropping it, as the FIN may have come after the frame.
pub fn take_end(recv: &mut quinn::RecvStream) {
    let mut spare = [0u8; 1];
    let read = std::pin::pin!(recv.read(&mut spare));
    let _ = read.poll(&mut std::task::Context::from_waker(std::task::Waker::noop()));
}

/// The host part of `addr` as a TLS server name (IP addresses are valid server names).
pub fn server_name(addr: &SocketAddr) -> String {
    addr.ip().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowance_widens_once_at_the_busy_rate() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut allowance = StreamAllowance::default();
        // Seven streams within a second: still quiet.
        for i in 0..BUSY_STREAMS_PER_SEC as u64 - 1 {
            assert!(!allowance.on_stream(ms(i * 100)));
        }
        // The eighth within that second widens it, and only once.
        assert!(allowance.on_stream(ms(900)));
        assert!(!allowance.on_stream(ms(950)));
        assert!(!allowance.on_stream(ms(5_000)));
    }

    #[test]
    fn allowance_stays_quiet_for_a_slow_sender() {
        let t0 = Instant::now();
        let mut allowance = StreamAllowance::default();
        // Two streams a second for a minute: each second starts a new count.
        for i in 0..120u64 {
            assert!(!allowance.on_stream(t0 + Duration::from_millis(i * 500)));
        }
    }
}
