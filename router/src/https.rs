//! Serves a warp filter over HTTPS: tokio-rustls on the same rustls (ring provider) that quinn
//! uses, and hyper's HTTP/1.1 connection driver. warp 0.4 no longer ships TLS itself.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

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
/// Concurrent HTTPS connections accepted before new ones wait.
const MAX_CONNECTIONS: usize = 4096;

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
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let service = service.clone();
        let shutdown = shutdown.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _permit = permit;
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
                .serve_connection(TokioIo::new(stream), handler);
            tokio::pin!(conn);
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(%peer, error = %e, "https connection ended with error");
                    }
                }
                _ = shutdown.cancelled() => conn.as_mut().graceful_shutdown(),
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
