//! The server's operations endpoint (plain HTTP, meant for a private network): `/metrics`
//! (Prometheus), `/health` (alive) and `/ready` (at least one router linked).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use cim_core::metrics::{Registry, render};
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;

use crate::session::State;

/// Serves the endpoint on `listener` until `shutdown`.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    registry: Option<Arc<Registry>>,
    state: Arc<State>,
    shutdown: CancellationToken,
) {
    loop {
        let (tcp, _) = tokio::select! {
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
        tokio::spawn(async move {
            let handler = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let response = answer(req.uri().path(), registry.as_deref(), &state);
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), handler)
                .await;
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
