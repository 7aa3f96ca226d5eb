//! Serving the gateway with a header read timeout, which `axum::serve` has
//! no way to set (it gives hyper no timer, so hyper's own 30 s default never
//! fires): a client that opens a connection and trickles its headers, or
//! holds an idle keep-alive connection, is cut off after
//! [`Settings::header_read_timeout`]. The body and the answer are bounded by
//! the router's request timeout ([`Settings::request_timeout`]).

use std::future::Future;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

use crate::Settings;

/// Serves `router` on `listener` until `shutdown` resolves, then lets the
/// requests in flight finish (idle connections close at once).
pub async fn serve(listener: TcpListener, router: Router, settings: Settings, shutdown: impl Future<Output = ()>) {
    let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    tracing::info!(name = "gateway", %addr, header_read_timeout = ?settings.header_read_timeout, "listening");
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(settings.header_read_timeout);
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    // Out of file descriptors and the like: wait, don't spin.
                    tracing::warn!(name = "gateway", "accept failed: {err}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let connection =
            builder.serve_connection_with_upgrades(TokioIo::new(stream), TowerToHyperService::new(router.clone()));
        let connection = graceful.watch(connection.into_owned());
        tokio::spawn(async move {
            // A client that goes away or is too slow ends its connection:
            // nothing for the server to act on.
            if let Err(err) = connection.await {
                tracing::debug!(name = "gateway", "connection ended: {err}");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
