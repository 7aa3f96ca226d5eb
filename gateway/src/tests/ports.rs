//! The gateway's port under abuse, on real sockets: silent clients, idle
//! connections by the thousand, a flood of status queries.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use super::*;

/// Serves `backend` on a free port of 127.0.0.1 until the test ends.
async fn serve_backend(backend: Arc<dyn Backend>, settings: Settings) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, app_with(backend, settings), settings, std::future::pending()));
    addr
}

/// Waits until the server closes `stream`; how long that took.
async fn closed_within(mut stream: TcpStream, limit: Duration) -> Duration {
    let started = Instant::now();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(limit, stream.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "still open after {limit:?}");
    started.elapsed()
}

/// One request on a connection of its own; the status and body.
async fn http(addr: std::net::SocketAddr, method: &str, path: &str, headers: &str, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n{headers}\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer).await;
    let status = answer.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, answer)
}

/// A client that connects and sends nothing, or only part of the HTTP/2
/// preface, is closed within the idle timeout: before the fix the
/// automatic protocol detection waited for it forever.
#[tokio::test]
async fn a_silent_client_is_closed_in_time_whatever_it_would_speak() {
    let connections = ConnectionLimits { idle_timeout: Duration::from_millis(300), ..ConnectionLimits::default() };
    let settings = Settings { connections, ..Settings::default() };
    let addr = serve_backend(Arc::new(TwinBackend::default()), settings).await;
    let silent = TcpStream::connect(addr).await.unwrap();
    let elapsed = closed_within(silent, Duration::from_secs(5)).await;
    assert!(elapsed >= Duration::from_millis(250) && elapsed < Duration::from_secs(2), "{elapsed:?}");

    let mut partial = TcpStream::connect(addr).await.unwrap();
    partial.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    let elapsed = closed_within(partial, Duration::from_secs(5)).await;
    assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");

    // An HTTP/2 client that says hello and then nothing: no stream, idle.
    let mut h2 = TcpStream::connect(addr).await.unwrap();
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00").await.unwrap();
    let elapsed = closed_within(h2, Duration::from_secs(5)).await;
    assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
}

/// 5,000 connections held open and idle (more than the cap of 1,024):
/// the idlest make room, and an order is taken at once.
#[tokio::test]
async fn five_thousand_idle_connections_do_not_stop_an_order() {
    let backend = Arc::new(TwinBackend::default());
    let settings = Settings::default();
    assert_eq!(settings.connections.max_connections, 1024);
    let addr = serve_backend(backend.clone(), settings).await;
    let mut idle = Vec::with_capacity(5_000);
    for _ in 0..5_000 {
        idle.push(TcpStream::connect(addr).await.unwrap());
    }
    let started = Instant::now();
    let (status, answer) = http(addr, "POST", "/order", "", &valid_order().to_string()).await;
    assert_eq!(status, 202, "{answer}");
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    assert_eq!(backend.placed.lock().unwrap().len(), 1);
    // The server keeps at most its cap: the oldest idle ones were closed.
    let mut closed = 0;
    for mut stream in idle.drain(..1_000) {
        let mut byte = [0u8; 1];
        if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(200), stream.read(&mut byte)).await {
            closed += 1;
        }
    }
    assert_eq!(closed, 1_000, "the first thousand idle connections made room");
}

/// The order service's four query slots, each query holding one for
/// `hold`: status queries and the idempotency check compete for them.
struct SlottedBackend {
    slots: tokio::sync::Semaphore,
    hold: Duration,
    placed: Mutex<Vec<OrderPlaced>>,
}

impl SlottedBackend {
    async fn query(&self) {
        let _slot = self.slots.acquire().await.unwrap();
        tokio::time::sleep(self.hold).await;
    }
}

impl Backend for SlottedBackend {
    fn place_order(&self, order: OrderPlaced) -> BoxFuture<'_, Result<(), PlaceError>> {
        self.placed.lock().unwrap().push(order);
        Box::pin(async { Ok(()) })
    }

    fn idempotency(&self, _: &str) -> BoxFuture<'_, Result<Option<String>, BackendError>> {
        Box::pin(async {
            self.query().await;
            Ok(None)
        })
    }

    fn order_status(&self, _: &str) -> BoxFuture<'_, Result<Option<serde_json::Value>, BackendError>> {
        Box::pin(async {
            self.query().await;
            Ok(None)
        })
    }

    fn catalog(&self) -> BoxFuture<'_, Result<Vec<CatalogItem>, BackendError>> {
        Box::pin(async { Ok(twin_catalog()) })
    }

    fn vault_card(&self, _: &str, number: String) -> BoxFuture<'_, Result<CardToken, BackendError>> {
        Box::pin(async move {
            let (brand, last4) = (shop_events::card::brand(&number).into(), shop_events::card::last4(&number).into());
            Ok(CardToken { token: "tok_1".into(), brand, last4 })
        })
    }
}

/// 200 clients asking `GET /order/x` as fast as they can: before the fix
/// they queued for the order service's query slots ahead of the
/// idempotency check, and `POST /order` with an `Idempotency-Key` timed out.
#[tokio::test]
async fn a_flood_of_status_queries_does_not_time_out_an_order() {
    let backend = Arc::new(SlottedBackend {
        slots: tokio::sync::Semaphore::new(4),
        hold: Duration::from_millis(50),
        placed: Mutex::default(),
    });
    let settings = Settings { request_timeout: Duration::from_secs(2), ..Settings::default() };
    let addr = serve_backend(backend.clone(), settings).await;
    let flooding = Arc::new(AtomicBool::new(true));
    let mut flood = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let flooding = flooding.clone();
        flood.spawn(async move {
            let mut answers = Vec::new();
            while flooding.load(Ordering::SeqCst) {
                answers.push(http(addr, "GET", "/order/x", "", "").await.0);
            }
            answers
        });
    }
    // Until the flood fills the slots and the gateway's queue.
    while backend.slots.available_permits() > 1 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let (status, answer) =
        http(addr, "POST", "/order", "idempotency-key: flood-1\r\n", &valid_order().to_string()).await;
    let took = started.elapsed();
    flooding.store(false, Ordering::SeqCst);
    assert_eq!(status, 202, "{answer}");
    assert!(took < Duration::from_secs(1), "the order took {took:?}");
    let answers: Vec<u16> = flood.join_all().await.into_iter().flatten().collect();
    assert!(answers.iter().all(|s| [404, 503].contains(s)), "{:?}", answers.iter().find(|s| ![404, 503].contains(*s)));
    assert!(answers.contains(&503), "some queries were turned away busy");
}
