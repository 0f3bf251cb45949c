//! One HTTP/1.1 connection served for a bounded time, for the router's HTTPS API and the
//! server's ops endpoint: hyper has no write timeout and no limit on a connection's life, so a
//! peer that keeps one open (or stops reading its answers) would hold its place for good.

use std::future::Future;
use std::time::Duration;

use hyper::body::{Body, Incoming};
use hyper::rt::{Read, Write};
use hyper::server::conn::http1::Connection;
use hyper::service::HttpService;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How a connection served by [`serve_for`] ended.
#[derive(Debug)]
pub enum Served {
    /// It closed, cleanly or with this error.
    Ended(Result<(), hyper::Error>),
    /// It was told to close (`lifetime` over, or shutdown) and had not within the grace.
    Dropped,
}

/// Drives `conn` until it ends, `shutdown` completes or `lifetime` passes. In the last two
/// cases it finishes the request under way and closes, and is dropped if that takes longer
/// than `grace`.
pub async fn serve_for<I, S, B>(
    conn: Connection<I, S>,
    lifetime: Duration,
    grace: Duration,
    shutdown: impl Future<Output = ()>,
) -> Served
where
    I: Read + Write + Unpin,
    S: HttpService<Incoming, ResBody = B>,
    S::Error: Into<BoxError>,
    B: Body + 'static,
    B::Error: Into<BoxError>,
{
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => return Served::Ended(result),
        () = shutdown => {}
        () = tokio::time::sleep(lifetime) => {}
    }
    conn.as_mut().graceful_shutdown();
    match tokio::time::timeout(grace, conn.as_mut()).await {
        Ok(result) => Served::Ended(result),
        Err(_) => Served::Dropped,
    }
}
