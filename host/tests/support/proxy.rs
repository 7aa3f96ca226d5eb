//! A TCP proxy to a server (PostgreSQL) that can be frozen: its
//! connections stay open and nothing moves through them, as a network
//! partition looks from the client. Shared by the integration tests and
//! the PostgreSQL adapter's own tests (`state/postgres/timeouts_tests.rs`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

type Reader = Box<dyn tokio::io::AsyncRead + Unpin + Send>;
type Writer = Box<dyn tokio::io::AsyncWrite + Unpin + Send>;

/// A proxy on `127.0.0.1:port`, on a runtime of its own (so that it keeps
/// moving bytes whatever the test's runtime does).
pub struct Proxy {
    pub port: u16,
    frozen: Arc<AtomicBool>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Proxy {
    /// Starts a proxy to `upstream`.
    pub fn start(upstream: SocketAddr) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let frozen = Arc::new(AtomicBool::new(false));
        let flag = frozen.clone();
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else { continue };
                let ((cr, cw), (sr, sw)) = (client.into_split(), server.into_split());
                let pumps: [(Reader, Writer); 2] = [(Box::new(cr), Box::new(sw)), (Box::new(sr), Box::new(cw))];
                for (from, to) in pumps {
                    tokio::spawn(pump(from, to, flag.clone()));
                }
            }
        });
        Self { port, frozen, runtime: Some(runtime) }
    }

    /// The proxy for the PostgreSQL server of `url`, and `url` through it.
    pub fn for_postgres(url: &str) -> (Self, String) {
        let config: tokio_postgres::Config = url.parse().unwrap();
        let upstream_port = config.get_ports().first().copied().unwrap_or(5432);
        let proxy = Self::start(SocketAddr::from(([127, 0, 0, 1], upstream_port)));
        let proxied = url.replace(&format!(":{upstream_port}"), &format!(":{}", proxy.port));
        (proxy, proxied)
    }

    /// Freezes every connection (`true`), or lets them move again.
    pub fn freeze(&self, frozen: bool) {
        self.frozen.store(frozen, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which a test's own runtime refuses.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Moves bytes from `from` to `to`, holding them while `frozen`.
async fn pump(mut from: Reader, mut to: Writer, frozen: Arc<AtomicBool>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let Ok(n) = from.read(&mut buf).await else { return };
        if n == 0 {
            return;
        }
        // Polling a flag is the whole point of a freeze a test controls.
        while frozen.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
