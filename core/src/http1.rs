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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::convert::Infallible;

    use bytes::Bytes;
    use http_body_util::Full;
    use hyper::{Request, Response};
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    use super::*;

    const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n";

    /// A connection whose handler answers `body` after `delay`, with its client end: the
    /// request is already written, so the connection reads it at its first turn.
    async fn connection(
        delay: Duration,
        body: usize,
        buffer: usize,
    ) -> (
        Connection<
            TokioIo<DuplexStream>,
            impl HttpService<Incoming, ResBody = Full<Bytes>, Error = Infallible>,
        >,
        DuplexStream,
    ) {
        let (mut client, server) = tokio::io::duplex(buffer);
        client.write_all(REQUEST).await.unwrap();
        let handler = hyper::service::service_fn(move |_: Request<Incoming>| async move {
            tokio::time::sleep(delay).await;
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(vec![b'x'; body]))))
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .serve_connection(TokioIo::new(server), handler);
        (conn, client)
    }

    /// Everything the server writes until it closes the connection.
    async fn read_to_close(mut client: DuplexStream) -> String {
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), client.read_to_end(&mut answer))
            .await
            .expect("the connection was never closed")
            .unwrap();
        String::from_utf8(answer).unwrap()
    }

    /// Serves a request that takes 500 ms for `lifetime` or until `shutdown`, and checks that
    /// it is answered whole and the connection then closed.
    async fn answered_then_closed(lifetime: Duration, shutdown: impl Future<Output = ()>) {
        let (conn, client) = connection(Duration::from_millis(500), 10, 64 * 1024).await;
        let serving = serve_for(conn, lifetime, Duration::from_secs(30), shutdown);
        let (served, answer) = tokio::join!(serving, read_to_close(client));
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("xxxxxxxxxx"), "{answer}");
        assert!(matches!(served, Served::Ended(Ok(()))), "{served:?}");
    }

    #[tokio::test]
    async fn a_connection_past_its_lifetime_answers_its_request_then_closes() {
        // The request takes longer than the lifetime: it is answered whole, and then the
        // connection ends (the client reads to the end, so it was closed).
        answered_then_closed(Duration::from_millis(100), std::future::pending()).await;
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_is_dropped_after_the_grace() {
        // An answer far larger than the pipe, to a client that reads none of it: the
        // connection cannot finish, so once its lifetime and grace are over it is dropped.
        let (conn, _client) = connection(Duration::ZERO, 1024 * 1024, 1024).await;
        let served = serve_for(
            conn,
            Duration::from_millis(100),
            Duration::from_millis(100),
            std::future::pending(),
        );
        let served = tokio::time::timeout(Duration::from_secs(30), served).await;
        assert!(matches!(served, Ok(Served::Dropped)));
    }

    #[tokio::test]
    async fn shutdown_lets_the_request_under_way_finish_then_closes() {
        // Shutdown comes while the request is being answered, long before the lifetime: the
        // answer is written whole, then the connection closes. Its clock starts at the
        // connection's first turn, as the lifetime's does.
        let shutdown = async { tokio::time::sleep(Duration::from_millis(100)).await };
        answered_then_closed(Duration::from_secs(3600), shutdown).await;
    }
}
