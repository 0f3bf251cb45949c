//! Serves a warp filter over HTTPS: tokio-rustls on the same rustls (ring provider) that quinn
//! uses, and hyper's HTTP/1.1 connection driver. warp 0.4 no longer ships TLS itself.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cim_core::http1::{Served, serve_for};
use cim_core::metrics::RouterMetrics;
use hyper_util::rt::TokioIo;
use rustls::HandshakeKind;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower_service::Service as _;
use warp::Filter;
use warp::reply::Response;

/// Time a client has to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most bytes of a request head (request line and headers) and of a connection's read buffer:
/// hyper's default (about 400 KB) let each of thousands of connections hold that much before
/// any request was authenticated. cim's heads are a few hundred bytes.
const MAX_READ_BUFFER: usize = 16 * 1024;
/// How long one connection serves requests; then it finishes the one under way and closes,
/// and is dropped if that takes longer than the request timeout and [`CLOSE_MARGIN`] (a
/// client that stopped reading its responses: hyper has no write timeout). Clients use a
/// connection per request, or reconnect. Shutdown closes connections the same way.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// See [`CONNECTION_LIFETIME`]: time to write the answer to a request that took its whole
/// timeout (`408`).
const CLOSE_MARGIN: Duration = Duration::from_secs(5);
/// Concurrent HTTPS connections accepted before new ones wait.
const MAX_CONNECTIONS: usize = 4096;
/// Concurrent HTTPS connections from one address (an IPv6 client's /64); past it new ones are
/// closed at once, so one host holding connections open (a TCP connect costs it nothing)
/// cannot take every place. Clients use one short connection per request.
const MAX_CONNECTIONS_PER_IP: usize = MAX_CONNECTIONS / 8;

/// Open HTTPS connections per address.
#[derive(Default)]
struct PerAddress {
    open: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
    refused: std::sync::atomic::AtomicU64,
}

/// One connection's place in [`PerAddress`]; given back when dropped.
struct AddressPlace {
    counts: Arc<PerAddress>,
    ip: std::net::IpAddr,
}

impl PerAddress {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<std::net::IpAddr, usize>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A place for one more connection from `peer`, unless its address holds its most.
    fn admit(self: &Arc<Self>, peer: SocketAddr) -> Option<AddressPlace> {
        let ip = cim_core::limit::address_key(peer.ip());
        let mut open = self.lock();
        let count = open.entry(ip).or_insert(0);
        if *count >= MAX_CONNECTIONS_PER_IP {
            drop(open);
            // Logged at the 1st, 2nd, 4th, 8th... refusal, not at every one.
            let refused = self
                .refused
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                + 1;
            if refused.is_power_of_two() {
                tracing::warn!(%ip, refused, "https connections from one address over the limit; closed");
            }
            return None;
        }
        *count += 1;
        Some(AddressPlace {
            counts: self.clone(),
            ip,
        })
    }
}

impl Drop for AddressPlace {
    fn drop(&mut self) {
        let mut open = self.counts.lock();
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// The peer address of an HTTPS request, inserted into request extensions.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

/// Accepts TLS connections on `listener` and serves `filter` on each until `shutdown`,
/// counting handshakes (full and resumed) in `metrics`. A request that takes longer than
/// `request_timeout` (a body trickled in, say) is answered `408` and its connection closed.
pub async fn serve<F>(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    filter: F,
    request_timeout: Duration,
    metrics: Arc<RouterMetrics>,
    shutdown: CancellationToken,
) where
    F: Filter<Extract = (Response,), Error = Infallible> + Clone + Send + Sync + 'static,
{
    let acceptor = TlsAcceptor::from(tls);
    let service = warp::service(filter);
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let per_address = Arc::new(PerAddress::default());
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and similar: back off instead of spinning.
                    tracing::warn!(error = %e, "https accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(place) = per_address.admit(peer) else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let service = service.clone();
        let shutdown = shutdown.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _permits = (permit, place);
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "tls handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "tls handshake timed out");
                    return;
                }
            };
            metrics.https_handshakes.inc();
            if stream.get_ref().1.handshake_kind() == Some(HandshakeKind::Resumed) {
                metrics.https_resumed.inc();
            }
            let handler =
                hyper::service::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(PeerAddr(peer));
                    let mut service = service.clone();
                    async move {
                        match tokio::time::timeout(request_timeout, service.call(req)).await {
                            Ok(answered) => answered,
                            Err(_) => {
                                tracing::info!(%peer, "https request timed out");
                                Ok(timed_out())
                            }
                        }
                    }
                });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .max_buf_size(MAX_READ_BUFFER)
                .serve_connection(TokioIo::new(stream), handler);
            let grace = request_timeout + CLOSE_MARGIN;
            match serve_for(conn, CONNECTION_LIFETIME, grace, shutdown.cancelled()).await {
                Served::Ended(Ok(())) => {}
                Served::Ended(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "https connection ended with error");
                }
                Served::Dropped => tracing::info!(%peer, "https connection did not close; dropped"),
            }
        });
    }
}

/// The answer to a request that took too long; the connection closes after it.
fn timed_out() -> Response {
    let body = r#"{"code":"timeout","message":"the request took too long"}"#;
    let mut response = Response::new(body.into());
    *response.status_mut() = http::StatusCode::REQUEST_TIMEOUT;
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    headers.insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("close"),
    );
    response
}
