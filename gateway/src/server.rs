//! Serving a router on a port with every connection bounded, whatever
//! protocol the client speaks (`axum::serve` sets no timer at all):
//!
//! - **Idle**: a connection with no request in flight for
//!   [`ConnectionLimits::idle_timeout`] is closed (gracefully: HTTP/2 gets a
//!   GOAWAY). This counts from the accept, so it also closes a client that
//!   connects and sends nothing, which hyper-util's automatic HTTP/1–HTTP/2
//!   detection would otherwise wait for forever (it has no timer before it
//!   decides), an HTTP/1 keep-alive connection between requests and an
//!   HTTP/2 connection with no stream open. HTTP/1 headers trickled byte by
//!   byte are cut off by hyper's header read timeout (the same duration);
//!   a request's body and answer by the router's own timeout.
//! - **Count**: at most [`ConnectionLimits::max_connections`] open at once.
//!   At the cap, a new connection takes the place of the one idle the
//!   longest, so that idle connections (5,000 held open by one client) can
//!   never lock out a request; if every connection has a request in flight,
//!   the new one is closed at once.
//!
//! Each request carries the peer's address as [`axum::extract::ConnectInfo`].

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tower::ServiceExt as _;

use crate::Settings;

/// How long and how many connections a port keeps open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Longest time a connection may stay open with no request in flight
    /// (from the accept on, so also before its first byte), and longest
    /// time an HTTP/1 request's headers may take.
    pub idle_timeout: Duration,
    /// Connections open at once, at most.
    pub max_connections: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self { idle_timeout: Duration::from_secs(5), max_connections: 1024 }
    }
}

/// How long a connection being closed (shutdown, idle, evicted) has to
/// finish what it has in flight before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(10);

/// Serves the gateway's `router` on `listener` until `shutdown` resolves,
/// then lets the requests in flight finish (idle connections close at once).
pub async fn serve(listener: TcpListener, router: Router, settings: Settings, shutdown: impl Future<Output = ()>) {
    serve_with("gateway".into(), listener, router, settings.connections, shutdown).await;
}

/// Serves `router` on `listener` (named `name` in logs) within `limits`
/// until `shutdown` resolves, then lets the requests in flight finish.
pub async fn serve_with(
    name: String,
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) {
    let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    tracing::info!(%name, %addr, idle_timeout = ?limits.idle_timeout, max_connections = limits.max_connections, "listening");
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.idle_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(limits.idle_timeout))
        .keep_alive_timeout(limits.idle_timeout)
        .max_concurrent_streams(128);
    let registry = Arc::new(Registry::default());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors and the like: wait, don't spin.
                    tracing::warn!(%name, "accept failed: {err}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        while tasks.try_join_next().is_some() {}
        let Some(conn) = registry.admit(limits.max_connections) else {
            tracing::warn!(%name, %peer, "connection refused: {} open, each with a request in flight", limits.max_connections);
            continue;
        };
        let connection = Connection { conn, peer, limits, registry: registry.clone(), stopped: stopped.clone() };
        tasks.spawn(connection.run(builder.clone(), stream, router.clone()));
    }
    drop(listener);
    let _ = stop.send(true);
    while tasks.join_next().await.is_some() {}
}

/// One connection's state, shared by its task, its requests and the
/// registry.
struct Conn {
    id: u64,
    in_flight: AtomicUsize,
    /// When the last request ended (or the connection was accepted), in ms
    /// since the registry's start.
    idle_since_ms: AtomicU64,
    /// Asks the connection to close (evicted to make room).
    evict: tokio::sync::Notify,
}

/// The open connections of one port.
struct Registry {
    started: Instant,
    next_id: AtomicU64,
    open: Mutex<HashMap<u64, Arc<Conn>>>,
}

impl Default for Registry {
    fn default() -> Self {
        Self { started: Instant::now(), next_id: AtomicU64::new(0), open: Mutex::default() }
    }
}

impl Registry {
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Registers a new connection, evicting the longest idle one at the
    /// cap; `None` if at the cap and none is idle.
    fn admit(&self, max: usize) -> Option<Arc<Conn>> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if open.len() >= max.max(1) {
            let idlest = open
                .values()
                .filter(|c| c.in_flight.load(Ordering::SeqCst) == 0)
                .min_by_key(|c| (c.idle_since_ms.load(Ordering::SeqCst), c.id))
                .map(|c| c.id)?;
            if let Some(evicted) = open.remove(&idlest) {
                evicted.evict.notify_one();
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let conn = Arc::new(Conn {
            id,
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(self.now_ms()),
            evict: tokio::sync::Notify::new(),
        });
        open.insert(id, conn.clone());
        Some(conn)
    }

    fn remove(&self, id: u64) {
        self.open.lock().unwrap_or_else(PoisonError::into_inner).remove(&id);
    }
}

/// Marks a request in flight on its connection until dropped.
struct InFlight {
    conn: Arc<Conn>,
    registry: Arc<Registry>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.conn.idle_since_ms.store(self.registry.now_ms(), Ordering::SeqCst);
        self.conn.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

struct Connection {
    conn: Arc<Conn>,
    peer: SocketAddr,
    limits: ConnectionLimits,
    registry: Arc<Registry>,
    stopped: tokio::sync::watch::Receiver<bool>,
}

impl Connection {
    /// When the connection will have been idle for the idle timeout, if it
    /// stays so; a request in flight puts the check one timeout ahead.
    fn idle_deadline(conn: &Conn, registry: &Registry, timeout: Duration) -> Instant {
        if conn.in_flight.load(Ordering::SeqCst) > 0 {
            return Instant::now() + timeout;
        }
        registry.started + Duration::from_millis(conn.idle_since_ms.load(Ordering::SeqCst)) + timeout
    }

    async fn run(self, builder: auto::Builder<TokioExecutor>, stream: tokio::net::TcpStream, router: Router) {
        let Self { conn, peer, limits, registry, mut stopped } = self;
        let service = {
            let (conn, registry) = (conn.clone(), registry.clone());
            hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
                conn.in_flight.fetch_add(1, Ordering::SeqCst);
                let guard = InFlight { conn: conn.clone(), registry: registry.clone() };
                request.extensions_mut().insert(ConnectInfo(peer));
                let answer = router.clone().oneshot(request);
                async move {
                    let response = answer.await;
                    drop(guard);
                    response
                }
            })
        };
        let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
        let mut connection = std::pin::pin!(connection);
        let mut close_by: Option<Instant> = None;
        loop {
            let deadline = Self::idle_deadline(&conn, &registry, limits.idle_timeout);
            let closing = close_by.is_some();
            tokio::select! {
                // A client that goes away or is too slow ends its
                // connection: nothing for the server to act on.
                ended = connection.as_mut() => {
                    if let Err(err) = ended {
                        tracing::debug!(%peer, "connection ended: {err}");
                    }
                    break;
                }
                () = conn.evict.notified(), if !closing => {}
                () = tokio::time::sleep_until(deadline), if !closing => {
                    // A request came and went meanwhile: look again.
                    if Instant::now() < Self::idle_deadline(&conn, &registry, limits.idle_timeout) {
                        continue;
                    }
                }
                _ = stopped.wait_for(|stopped| *stopped), if !closing => {}
                () = tokio::time::sleep_until(close_by.unwrap_or_else(Instant::now)), if closing => break,
            }
            // Evicted, idle or shutting down: no new request; what is in
            // flight has the grace to finish.
            connection.as_mut().graceful_shutdown();
            close_by = Some(Instant::now() + CLOSE_GRACE);
        }
        registry.remove(conn.id);
    }
}
