//! The server's operations endpoint (plain HTTP, meant for a private network): `/metrics`
//! (Prometheus), `/health` (alive) and `/ready` (at least one router linked). Private or not,
//! a peer that opens connections and sends nothing, or a head without end, holds a place only
//! for a moment and a bounded number of them at once.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cim_core::http1::{Served, serve_for};
use cim_core::metrics::{Registry, render};
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;

use crate::session::State;

/// Connections served at once; further ones wait in the listener's backlog. A scraper and a
/// probe or two need a few.
const MAX_CONNECTIONS: usize = 64;
/// Time a connection has to send a whole request head (from the moment it is accepted).
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Most bytes of a request head; a longer one is answered `431`.
const MAX_READ_BUFFER: usize = 16 * 1024;
/// How long one connection serves; then it finishes its request and closes, and is dropped
/// if it has not within [`CLOSE_GRACE`] (a peer that stopped reading its answer).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// See [`CONNECTION_LIFETIME`].
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Serves the endpoint on `listener` until `shutdown`.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    registry: Option<Arc<Registry>>,
    state: Arc<State>,
    shutdown: CancellationToken,
) {
    let places = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let place = tokio::select! {
            _ = shutdown.cancelled() => return,
            place = places.clone().acquire_owned() => match place {
                Ok(place) => place,
                Err(_) => return,
            },
        };
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, say: retrying at once would spin a core.
                    tracing::warn!(error = %e, "ops endpoint: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let registry = registry.clone();
        let state = state.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _place = place;
            let handler = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let response = answer(req.uri().path(), registry.as_deref(), &state);
                async move { Ok::<_, Infallible>(response) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .max_buf_size(MAX_READ_BUFFER)
                .serve_connection(TokioIo::new(tcp), handler);
            match serve_for(conn, CONNECTION_LIFETIME, CLOSE_GRACE, shutdown.cancelled()).await {
                Served::Ended(Ok(())) => {}
                Served::Ended(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "ops connection ended with error");
                }
                Served::Dropped => tracing::debug!(%peer, "ops connection did not close; dropped"),
            }
        });
    }
}

fn answer(path: &str, registry: Option<&Registry>, state: &State) -> Response<Full<Bytes>> {
    let (status, body) = match path {
        "/metrics" => match registry {
            Some(r) => (StatusCode::OK, render(r)),
            None => (StatusCode::NOT_FOUND, "metrics are not enabled\n".into()),
        },
        "/health" => (StatusCode::OK, "ok\n".into()),
        "/ready" if state.links.is_empty() => {
            (StatusCode::SERVICE_UNAVAILABLE, "no router linked\n".into())
        }
        "/ready" => (StatusCode::OK, "ready\n".into()),
        _ => (StatusCode::NOT_FOUND, "not found\n".into()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}
